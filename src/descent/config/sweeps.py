"""Before a multirun: each job of a grid, or an Optuna study's settings and space, composed by Hydra and validated."""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from descent.config.checks import validate
from descent.config.rules import STRING, ConfigError, integer, is_int, show, why

OPTUNA = "hydra_plugins.descent_optuna_sweeper."


def validate_sweep(config: DictConfig) -> None:
    """Compose and check every job of a multirun before the first one starts (BasicSweeper's grid).

    A sweep of a hundred jobs should not run ninety and stop at a typo; each bad job is named by its
    overrides, with its problems.
    """
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if target.startswith(OPTUNA):
        return validate_study(config)
    if not target.endswith(".BasicSweeper"):
        return  # another sweeper picks its jobs as it goes: each job checks itself
    loader, parsed = _overrides(config)
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    [jobs] = BasicSweeper.split_arguments(parsed, None)

    def name(num: int, overrides: list[str]) -> str:  # a job by what the sweep varies
        varied = " ".join(o for o in overrides if o.split("=", 1)[0] in swept) or " ".join(overrides)
        return f"job #{num} ({varied})"

    problems = _each_job(config, loader, [(list(o), name(num, o)) for num, o in enumerate(jobs)])
    if problems:
        raise ConfigError(
            f"{len(problems)} of the sweep's {len(jobs)} jobs are invalid; no job was started:\n" + "\n".join(problems)
        )


def _overrides(config: DictConfig):
    """Hydra's loader, and the sweeper's params with the command line's overrides, parsed as Hydra parses them."""
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    parser = OverridesParser.create(config_loader=loader)
    return loader, parser.parse_overrides(params + list(config.hydra.overrides.task))


def _each_job(config: DictConfig, loader, jobs: list, first=None) -> list[str]:
    """Compose and validate each (overrides, name): its problems under its name. `first(task)` sees the first
    job's task config and returns more problems."""
    problems, hydra_config = [], HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        for num, (overrides, name) in enumerate(jobs):
            try:
                job = loader.load_sweep_config(config, overrides)
                hydra_config.set_config(job)  # the presets' ${hydra:runtime.choices...} resolve per job
                task = OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])
                if first is not None and num == 0:
                    problems += first(task)
                validate(task)
            except (ConfigError, HydraException) as e:
                problems.append(f"{name}:\n  " + str(e).replace("\n", "\n  "))
    finally:
        hydra_config.cfg = saved
    return problems


def _candidates(override) -> list:
    """The values of a search-space override a study can reach: an interval's two ends, every choice,
    every value of a range."""
    if override.is_interval_sweep():
        return [override.value().start, override.value().end]
    return list(override.sweep_iterator(transformer=Transformer.encode))[:1000]


def _validation_data(task: DictConfig) -> list[str]:
    """The objective is measured on the validation data."""
    val_size, objective = task.data.get("val_size", 0), task.get("sweep", {}).get("objective")
    if is_int(val_size) and val_size > 0:
        return []
    return [
        f"data.val_size={show(val_size)}: must be > 0 in an Optuna study (its objective, "
        f"sweep.objective={objective}, is measured on the validation data; e.g. data.val_size=10000)"
    ]


def validate_study(config: DictConfig) -> None:
    """Check an Optuna study before its first trial (hydra/sweeper=optuna): the sweeper's keys, each
    interval's bounds and each choice or range value composed into a job and validated like a grid's jobs,
    validation data for the objective. Every problem at once."""
    # optuna is an extra (pip install descent[optuna]) and ~0.3 s to import: only when a study is checked
    from hydra_plugins.descent_optuna_sweeper._impl import create_optuna_distribution_from_override

    sweeper, problems = config.hydra.sweeper, []
    for key, rule in {"n_trials": integer(1), "n_jobs": integer(1), "storage": STRING, "study_name": STRING}.items():
        value = OmegaConf.select(sweeper, key, default=None)
        if not rule[0](value):
            because = " (the jobs find their trial in the study's database)" if key == "storage" else ""
            problems.append(f"hydra.sweeper.{key}={show(value)}: must be {rule[1]}{because}")
    loader, parsed = _overrides(config)
    space, fixed = {}, [o.input_line for o in parsed if not o.is_sweep_override()]
    for o in parsed:
        if not o.is_sweep_override():
            continue
        text = o.input_line or o.get_key_element()
        try:
            create_optuna_distribution_from_override(o)  # the sweeper's own reading: optuna refuses low > high,
            space[o.get_key_element()] = (text, _candidates(o))  # a log scale from 0 or below, ...
        except (ValueError, TypeError, NotImplementedError, AssertionError) as e:
            problems.append(f"{text}: not a search space Optuna takes: {why(e)}")
    # a grid of studies (hydra.sweeper.grid): each of its values is a value the jobs run with
    grid = OmegaConf.select(sweeper, "grid", default=None) or {}
    for o in OverridesParser.create(config_loader=loader).parse_overrides([f"{k}={v}" for k, v in grid.items()]):
        key = o.get_key_element()
        text = f"hydra.sweeper.grid.{key}={grid[key]}"
        if key in space or key in {f.split("=", 1)[0] for f in fixed}:
            problems.append(f"{text}: {key} is also set by the search space or the command line; give it in one place")
            continue
        space[key] = (text, _candidates(o) if o.is_sweep_override() else [o.value()])
    # the settings alone, then each value with the others left at the settings' (one job per value: each
    # problem named by the value that makes it)
    jobs = [(fixed, "the study's settings")] + [
        (fixed + [f"{key}={v}"], f"{text}: value {show(v)}") for key, (text, values) in space.items() for v in values
    ]
    problems += _each_job(config, loader, jobs, first=_validation_data)
    if problems:
        raise ConfigError("the Optuna study is invalid; no trial was started:\n" + "\n".join(problems))

# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved
import functools
import logging
import math
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    List,
    MutableSequence,
    Optional,
    Sequence,
    Tuple,
)

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial, TrialState

from .config import Direction

log = logging.getLogger(__name__)


def create_optuna_distribution_from_override(override: Override) -> Any:
    if not override.is_sweep_override():
        return override.get_value_element_as_str()

    value = override.value()
    choices: List[CategoricalChoiceType] = []
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        for x in override.sweep_iterator(transformer=Transformer.encode):
            assert isinstance(x, (str, int, float, bool, type(None))), (
                f"A choice sweep expects str, int, float, bool, or None type. Got {type(x)}."
            )
            choices.append(x)
        return CategoricalDistribution(choices)

    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        assert value.start is not None
        assert value.stop is not None
        if value.shuffle:
            for x in override.sweep_iterator(transformer=Transformer.encode):
                assert isinstance(x, (str, int, float, bool, type(None))), (
                    f"A choice sweep expects str, int, float, bool, or None type. Got {type(x)}."
                )
                choices.append(x)
            return CategoricalDistribution(choices)
        # descent: the values of range(start, stop, step) as the grid sweeper takes them, stop excluded;
        # optuna's high is included, so it gets the last value the range reaches
        step = value.step if value.step else 1
        n = math.ceil((value.stop - value.start) / step)
        if n < 1:
            raise ValueError(f"range({value.start}, {value.stop}, {step}) holds no value")
        ends = sorted([value.start, value.start + step * (n - 1)])
        if (
            isinstance(value.start, float)
            or isinstance(value.stop, float)
            or isinstance(value.step, float)
        ):
            return FloatDistribution(
                float(ends[0]), round(float(ends[1]), 12), step=abs(float(step))
            )
        return IntDistribution(int(ends[0]), int(ends[1]), step=abs(int(step)))

    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        assert value.start is not None
        assert value.end is not None
        if "log" in value.tags:
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(int(value.start), int(value.end), log=True)
            return FloatDistribution(value.start, value.end, log=True)
        else:
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end)
            return FloatDistribution(value.start, value.end)

    raise NotImplementedError(f"{override} is not supported by Optuna sweeper.")


def create_params_from_overrides(
    arguments: List[str],
) -> Tuple[Dict[str, BaseDistribution], Dict[str, Any], List[str]]:
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(arguments)
    search_space_distributions = dict()
    fixed_params = dict()
    fixed_overrides = []

    for override in parsed:
        if override.is_delete():
            assert override.input_line is not None
            fixed_overrides.append(override.input_line)
            continue
        param_name = override.get_key_element()
        value = create_optuna_distribution_from_override(override)
        if isinstance(value, BaseDistribution):
            search_space_distributions[param_name] = value
        else:
            fixed_params[param_name] = value
    return search_space_distributions, fixed_params, fixed_overrides


def grid_studies(study_name: str, grid: Any) -> List[Tuple[str, List[str]]]:
    """descent: [(study name, overrides)], one per combination of the grid's values (the grid sweeper's
    syntax and order), named <study_name>-<value>-<value>; [(study_name, [])] without a grid."""
    if not grid:
        return [(study_name, [])]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in grid.items()])
    [cells] = BasicSweeper.split_arguments(parsed, None)
    return [(f"{study_name}-" + "-".join(o.split("=", 1)[1] for o in cell), list(cell)) for cell in cells]


def failure_of(value: Any) -> Optional[str]:
    """descent: why a job's return value is no result (None, NaN, not a number), or None for a result."""
    if value is None:
        return "the job returned no value (its run failed, diverged or missed its target)"
    try:
        number = float(value)
    except (ValueError, TypeError):
        return f"return value must be float-castable, got {value!r}"
    if not math.isfinite(number):
        return f"the job returned {number}"
    return None


def tell(study: optuna.Study, trial: Trial, state: TrialState, values: Optional[List[float]]) -> None:
    """study.tell; the grid sampler's end of the grid is not an error. Its after_trial calls study.stop() when
    the last grid point is told, which raises outside optimize(): upstream caught it for a COMPLETE trial
    only, so a cell whose last trial failed (missed its target) ended the whole sweep (descent)."""
    try:
        study.tell(trial=trial, state=state, values=values)
    except RuntimeError as e:
        if not (isinstance(study.sampler, optuna.samplers.GridSampler)
                and "`Study.stop` is supposed to be invoked inside an objective function" in str(e)):
            raise


class OptunaSweeperImpl(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Optional[Any],
        study_name: Optional[str],
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: Optional[str],
        params: Optional[DictConfig],
        pruner: Optional[Any] = None,
        grid: Optional[DictConfig] = None,
    ) -> None:
        self.sampler_config = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        assert self.max_failure_rate >= 0.0
        assert self.max_failure_rate <= 1.0
        self.custom_search_space_extender: Optional[
            Callable[[DictConfig, Trial], None]
        ] = None
        if custom_search_space:
            self.custom_search_space_extender = get_method(custom_search_space)
        self.params = params
        self.pruner = pruner
        self.grid = grid
        self.job_idx: int = 0

    def _process_searchspace_config(self) -> None:
        if self.params is None:
            self.params = OmegaConf.create({})

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.job_idx = 0
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = config.hydra.sweep.dir

    def _get_directions(self) -> List[str]:
        if isinstance(self.direction, MutableSequence):
            return [d.name if isinstance(d, Direction) else d for d in self.direction]
        elif isinstance(self.direction, str):
            return [self.direction]
        return [self.direction.name]

    def _configure_trials(
        self,
        trials: List[Trial],
        search_space_distributions: Dict[str, BaseDistribution],
        fixed_params: Dict[str, Any],
        fixed_overrides: List[str],
        cell: Sequence[str] = (),
    ) -> Sequence[Sequence[str]]:
        overrides = []
        for trial in trials:
            for param_name, distribution in search_space_distributions.items():
                assert type(param_name) is str
                trial._suggest(param_name, distribution)
            for param_name, value in fixed_params.items():
                trial.set_user_attr(param_name, value)

            if self.custom_search_space_extender:
                assert self.config is not None
                self.custom_search_space_extender(self.config, trial)

            overlap = trial.params.keys() & trial.user_attrs
            if len(overlap):
                raise ValueError(
                    "Overlapping fixed parameters and search space parameters found!"
                    f"Overlapping parameters: {list(overlap)}"
                )
            params = dict(trial.params)
            params.update(fixed_params)

            overrides.append(
                tuple(f"{name}={val}" for name, val in params.items())
                + tuple(fixed_overrides)
                # descent: the job finds its trial (to report to the pruner, to tag its run); in a grid, its
                # combination's values and study
                + (f"hydra.sweeper.trial={trial.number}",)
                + ((*cell, f"hydra.sweeper.study_name='{trial.study.study_name}'") if cell else ())
            )
        return overrides

    def _parse_sweeper_params_config(self) -> List[str]:
        if not self.params:
            return []

        return [f"{k!s}={v}" for k, v in self.params.items()]

    def _to_grid_sampler_choices(self, distribution: BaseDistribution) -> Any:
        # descent: high is one of the values (upstream left it out)
        if isinstance(distribution, CategoricalDistribution):
            return distribution.choices
        elif isinstance(distribution, IntDistribution):
            assert distribution.step is not None, (
                "`step` of IntDistribution must be a positive integer."
            )
            n_items = (distribution.high - distribution.low) // distribution.step + 1
            return [distribution.low + i * distribution.step for i in range(n_items)]
        elif (
            isinstance(distribution, FloatDistribution)
            and distribution.step is not None
        ):
            n_items = round((distribution.high - distribution.low) / distribution.step) + 1
            return [distribution.low + i * distribution.step for i in range(n_items)]
        else:
            raise ValueError("GridSampler only supports discrete distributions.")

    def _make_sampler(self, search_space: Dict[str, Any], trials_so_far: int) -> Any:
        """descent: the sampler, its seed moved on by the trials the study already has."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.sampler_config, resolve=True))
        if cfg.get("seed") is not None:
            cfg.seed = int(cfg.seed) + trials_so_far
        sampler = instantiate(cfg)
        if isinstance(sampler, functools.partial):  # GridSampler: the grid comes from the overrides
            sampler = sampler(search_space)
        return sampler

    def sweep(self, arguments: List[str]) -> None:
        assert self.config is not None
        assert self.launcher is not None
        assert self.hydra_context is not None
        assert self.job_idx is not None

        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        # descent: jobs are numbered after the job folders the sweep directory already holds (a study that goes
        # on, or another grid under the same hydra.sweep.dir and parent run): no earlier job's folder is reused
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        taken = [int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()] if sweep_dir.is_dir() else []
        self.job_idx = max(self.job_idx, max(taken, default=-1) + 1)

        is_grid_sampler = str(self.sampler_config.get("_target_")) == "optuna.samplers.GridSampler"

        (
            override_search_space_distributions,
            fixed_params,
            fixed_overrides,
        ) = create_params_from_overrides(params_conf)

        search_space_distributions = override_search_space_distributions

        search_space_for_grid_sampler = {}
        if is_grid_sampler:
            search_space_for_grid_sampler = {
                name: self._to_grid_sampler_choices(distribution)
                for name, distribution in search_space_distributions.items()
            }
            n_trial = 1
            for v in search_space_for_grid_sampler.values():
                n_trial *= len(v)
            self.n_trials = min(self.n_trials, n_trial)
            log.info(
                f"Updating num of trials to {self.n_trials} due to using GridSampler."
            )

        # Remove fixed parameters from Optuna search space.
        for param_name in fixed_params:
            if param_name in search_space_distributions:
                del search_space_distributions[param_name]

        directions = self._get_directions()
        # descent: one study, or one per combination of hydra.sweeper.grid's values (in the grid's order)
        studies = grid_studies(self.study_name, self.grid)
        overlap = {o.split("=", 1)[0] for _, cell in studies for o in cell} & (
            set(search_space_distributions) | set(fixed_params))
        if overlap:
            raise ValueError(f"hydra.sweeper.grid and the search space both set {sorted(overlap)}")
        results = []
        for study_name, cell in studies:
            if cell:
                log.info(f"Grid: {' '.join(cell)}")
            results.append(self._study(study_name, cell, directions, search_space_for_grid_sampler,
                                       search_space_distributions, fixed_params, fixed_overrides))
        results_to_serialize = results[0] if not self.grid else {"name": "optuna", "grid": results}
        OmegaConf.save(
            OmegaConf.create(results_to_serialize),
            f"{self.config.hydra.sweep.dir}/optimization_results.yaml",
        )

    def _study(self, study_name, cell, directions, search_space_for_grid_sampler,
               search_space_distributions, fixed_params, fixed_overrides) -> Dict[str, Any]:
        """descent: upstream's sweep loop for one study (one combination of a grid)."""

        study = optuna.create_study(
            study_name=study_name,
            storage=self.storage,
            pruner=instantiate(self.pruner) if self.pruner else None,
            directions=directions,
            load_if_exists=True,
        )
        # descent: a study that goes on numbers its jobs after its trials, and its sampler's seed moves on
        trials_so_far = len(study.trials)
        self.job_idx = max(self.job_idx, trials_so_far)  # a grid's studies: one job numbering in the sweep
        study.sampler = self._make_sampler(search_space_for_grid_sampler, trials_so_far)
        if cell:  # descent: the grid's values on the study (a sampler may read them: descent/sweep/protocol.py)
            study.set_user_attr("descent.cell", dict(o.split("=", 1) for o in cell))
        if hasattr(study.sampler, "space"):  # descent: a sampler that plans all parameters at once
            study.sampler.space = dict(search_space_distributions)
        # descent: a sampler that decides when its study is done (descent/sweep/protocol.py): n_trials is then a cap
        finished = getattr(study.sampler, "finished", lambda study: False)
        if hasattr(study.sampler, "finished"):  # trials an earlier command left running died with it (Ctrl-C, a
            # lost node): FAIL, marked interrupted, so that such a sampler proposes them again
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                study._storage.set_trial_user_attr(t._trial_id, "descent.interrupted", True)
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                log.warning(f"Study {study.study_name}: trial {t.number} was left running by an earlier command: "
                            "FAIL, to be run again")
        log.info(f"Study name: {study.study_name}" + (f" ({trials_so_far} trials so far)" if trials_so_far else ""))
        log.info(f"Sampler: {type(study.sampler).__name__}")
        log.info(f"Directions: {directions}")

        batch_size = self.n_jobs
        n_trials_to_go = self.n_trials

        while n_trials_to_go > 0:
            batch_size = min(n_trials_to_go, self.n_jobs)

            trials = []
            for _ in range(batch_size):
                if finished(study):
                    break
                trials.append(study.ask())
            if not trials:
                log.info(f"Study {study.study_name}: its sampler has nothing left to run")
                break
            batch_size = len(trials)
            overrides = self._configure_trials(
                trials, search_space_distributions, fixed_params, fixed_overrides, cell
            )

            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures = []
            for trial, ret in zip(trials, returns):
                # descent: a job may have finished its own trial (pruned): it stays as the job left it
                if study._storage.get_trial(trial._trial_id).state.is_finished():
                    continue
                values: Optional[List[float]] = None
                state: optuna.trial.TrialState = optuna.trial.TrialState.COMPLETE
                try:
                    if len(directions) == 1:
                        # descent: None and NaN (a failed or diverged run) fail the trial, with the reason
                        if why := failure_of(ret.return_value):
                            raise ValueError(why)
                        values = [float(ret.return_value)]
                    else:
                        try:
                            values = [float(v) for v in ret.return_value]
                        except (ValueError, TypeError):
                            raise ValueError(
                                "Return value must be a list or tuple of float-castable values."
                                f" Got '{ret.return_value}'."
                            )
                        if len(values) != len(directions):
                            raise ValueError(
                                "The number of the values and the number of the objectives are"
                                f" mismatched. Expect {len(directions)}, but actually {len(values)}."
                            )

                    tell(study, trial, state, values)

                except Exception as e:
                    state = optuna.trial.TrialState.FAIL
                    tell(study, trial, state, None)
                    log.warning(f"Trial {trial.number} failed: {e}")
                    failures.append(e)

            # raise if too many failures
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error(
                    f"Failed {len(failures)} times out of {len(returns)} "
                    f"with max_failure_rate={self.max_failure_rate}."
                )
                assert len(failures) > 0
                for ret in returns:
                    ret.return_value  # delegate raising to JobReturn, with actual traceback
                raise RuntimeError(
                    f"{len(failures)} of {len(returns)} trials failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate} allows"
                )

            n_trials_to_go -= batch_size

        results_to_serialize: Dict[str, Any]
        if len(directions) < 2:
            # descent: a study without a completed trial says so (upstream: ValueError from best_trial)
            completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not completed:
                states = [t.state.name for t in study.get_trials(deepcopy=False)]
                counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
                # debug: the sweep's callback (descent.sweep) says it once, with the parent run's record
                log.debug(
                    f"Study {study.study_name}: no trial completed ({counts}); there is no best trial"
                )
                results_to_serialize = {
                    "name": "optuna",
                    "study_name": study.study_name,
                    "best_params": None,
                    "best_value": None,
                }
            else:
                best_trial = study.best_trial
                results_to_serialize = {
                    "name": "optuna",
                    "study_name": study.study_name,
                    "best_trial": best_trial.number,
                    "best_params": best_trial.params,
                    "best_value": best_trial.value,
                }
                log.info(f"Best trial: {best_trial.number}")
                log.info(f"Best parameters: {best_trial.params}")
                log.info(f"Best value: {best_trial.value}")
        else:
            best_trials = study.best_trials
            pareto_front = [
                {"params": t.params, "values": t.values} for t in best_trials
            ]
            results_to_serialize = {
                "name": "optuna",
                "solutions": pareto_front,
            }
            log.info(f"Number of Pareto solutions: {len(best_trials)}")
            for t in best_trials:
                log.info(f"    Values: {t.values}, Params: {t.params}")
        return results_to_serialize

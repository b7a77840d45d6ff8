"""The resume policy: what `resume=<run> key=value` may change (how a run goes on, never what it computes), and the
run to resume, found in the store with that policy applied."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from descent.config.rules import ConfigError, is_int, show
from descent.tracking import store

log = logging.getLogger("descent")  # the entry point's logger: the line is src/train.py's

# What `resume=<run> key=value` may change: how the run is carried on, shown and recorded, never what it
# computes. Resumed with any of these, the run's numbers are those of the same run left alone (its data
# order is a function of seed and epoch, so more epochs continue the order the longer run would have had).
# Everything else is refused when it differs from the run's record: data.* (other examples, order or
# checkpoint boundaries), model.*, optimizer.*, batching, seed, trainer.log_every_examples and
# val_every_examples (the metric axes), trainer.accelerator, cuda_graphs, compile_optimizer and
# flush_denormal (other kernels: other numbers in the last bits), logger.experiment_name (a run stays in
# its experiment) and the experiment presets.
RESUME_MAY_CHANGE = {
    "trainer.max_epochs": "the budget, which a resume may raise (never lower)",
    "trainer.progress_bar": "display only",
    "trainer.threads": "the machine's share of CPUs, which may differ where the run goes on (the numbers "
    "change only in float summation order)",
    "trainer.checkpoint_every_seconds": "how often the state is saved (a resume from any checkpoint gives the "
    "same numbers: tests/test_resume.py)",
    "trainer.max_updates": "the budget in updates (as max_epochs is in examples)",
    "trainer.noise_scale": "what is measured beside the run (never its numbers: tests/test_noise.py)",
    "trainer.noise_at_targets": "what is measured beside the run (never its numbers: tests/test_noise.py)",
    "trainer.noise_hessian_at_targets": "what is measured beside the run (never its numbers: "
    "tests/test_noise_hessian.py)",
    "trainer.noise_hessian_subset": "what is measured beside the run (never its numbers)",
    "trainer.noise_preconditioned_at_targets": "what is measured beside the run (never its numbers: "
    "tests/test_noise_hessian.py)",
    "logger.tracking_uri": "where the run is recorded (it is looked up there)",
    "logger.log_checkpoint": "what is recorded",
    "logger.outage_seconds": "how long a tracking server may be away",
    "logger.log_model": "what is recorded",
    "logger.register_model": "what is recorded",
    "logger.system_metrics": "what is recorded",
    "logger.log_errors": "what is recorded",
    "data.root": "where the data files are (other files are refused by their checks and the checkpoint's)",
    "data.download": "where missing data files come from",
}


def resume_config(
    cfg: DictConfig,
    choices: dict,
    overrides: list[str],
    recorded: DictConfig,
    recorded_choices: dict,
    run: str,
    status: str,
) -> tuple[DictConfig, dict]:
    """The config a resumed run runs with: its record, with the command line's RESUME_MAY_CHANGE keys.

    The overrides are Hydra's own record of the command line (hydra.overrides.task), so a default
    changed in conf/ since the run started is not mistaken for the user's wish. An override that names
    another key is refused unless it gives the recorded value. Returns (config, {key: (recorded, given)}
    for what changed).
    """
    merged = OmegaConf.merge(recorded, {"resume": cfg.resume})
    changed, refused = {}, []
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    # where the run was found is where it goes on being recorded, given on the command line or not
    for key in dict.fromkeys(keys + ["logger.tracking_uri"]):
        if key == "resume":
            continue
        if key in choices:  # a config group: optimizer=sgd, batching=online, experiment=...
            if key not in recorded_choices and choices[key] is not None:
                refused.append(
                    f"{key}={choices[key]}: the run's record has no {key} (a preset changes what the run measures)"
                )
            elif key in recorded_choices and choices[key] != recorded_choices[key]:
                refused.append(f"{key}: recorded {recorded_choices[key]}, given {choices[key]}")
            continue
        was = OmegaConf.select(recorded, key, default=None)
        given = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(given):
            given = OmegaConf.to_container(given, resolve=True)
            was = OmegaConf.to_container(was, resolve=True) if OmegaConf.is_config(was) else was
        if given == was:
            continue
        if key not in RESUME_MAY_CHANGE:
            refused.append(f"{key}: recorded {show(was)}, given {show(given)}")
        elif key == "trainer.max_epochs" and is_int(was) and is_int(given) and given < was:
            refused.append(f"{key}: recorded {was}, given {given}: a resume may raise it, never lower it")
        else:
            OmegaConf.update(merged, key, given, force_add=True)
            changed[key] = (was, given)
    if refused:
        raise ConfigError(
            f"resume={run}: the run would no longer measure what it recorded; these overrides differ from its "
            "record:\n  "
            + "\n  ".join(refused)
            + "\nA resume may change only "
            + ", ".join(RESUME_MAY_CHANGE)
            + "; for the others start a new run."
        )
    if status == "FINISHED" and "trainer.max_epochs" not in changed:
        raise ConfigError(
            f"resume={run}: the run is FINISHED after trainer.max_epochs="
            f"{show(recorded.trainer.max_epochs)}; continue it with a larger trainer.max_epochs, "
            "or start a new run"
        )
    return merged, changed


def resume_run(cfg: DictConfig, hc: DictConfig, uri: str) -> tuple[DictConfig, tuple]:
    """resume=: continue a run from its last checkpoint, with its own config, into the same MLflow run (the
    checkpoint comes from the run's artifacts when this machine lacks its output folder); the command line may
    change how it goes on (more epochs, what is recorded), not what it measures (resume_config). Returns the
    config to run and (run id, output folder, group choices, {key: (recorded, given)} changed)."""
    check = partial(resume_config, cfg, dict(hc.runtime.choices), list(hc.overrides.task))
    run_id, out_dir, (cfg, changed), choices = store.find_resume(
        str(cfg.resume), uri, Path(hc.runtime.output_dir), check
    )
    log.info(
        "resuming MLflow run %s from %s%s",
        run_id,
        out_dir / "checkpoints" / "last.ckpt",
        "".join(f"; {k}: {a} -> {b}" for k, (a, b) in changed.items()),
    )
    return cfg, (run_id, out_dir, choices, changed)

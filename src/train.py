"""Train one configuration and record it in MLflow.  `python src/train.py --help` lists the options."""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from descent.config import ConfigError, register, resume_config, validate
from descent.console import terminal
from descent.tracking import store

log = logging.getLogger("descent")
register()  # conf/'s ${descent.*:...} resolvers, before Hydra composes and resolves conf/
terminal.quiet_third_parties()  # before MLflow is imported: its log lines through Hydra's (descent/console/terminal.py)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if not hc.verbose:  # MLflow's bar as it downloads a checkpoint, its "View run" lines (the closing block names it)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:  # every problem at once, before anything is built and before any MLflow run exists
        validate(cfg)
        uri = store.tracking_uri(cfg.logger.tracking_uri, hc.runtime.cwd)
        store.check_store(uri)
        if cfg.resume:  # continue a run from its last checkpoint, with its own config, into the same MLflow run
            # (the checkpoint comes from the run's artifacts when this machine lacks its output folder); the
            # command line may change how it goes on (more epochs, what is recorded), not what it measures
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
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("invalid config, nothing was run:\n%s", e)
        sys.exit(2)

    from descent import pipeline  # Lightning, MLflow: tens of seconds under load; --help and refused input skip them

    resumed = pipeline.Resumed(run_id, out_dir, choices, changed) if cfg.resume else None
    try:
        run = pipeline.build(cfg, hc, resumed)  # data, module and its measurements, logger, callbacks, Trainer
    except Exception as e:  # pipeline.ENDINGS decides: bad data is refused, the rest raised
        return pipeline.end(e, hc)
    try:
        pipeline.fit(run)
    except BaseException as e:  # pipeline.ENDINGS: the run's status and tags, the log line, the exit status
        return pipeline.end(e, hc, run)
    return pipeline.finish(run)  # FINISHED, the closing block; the objective a search optimises


if __name__ == "__main__":
    main()

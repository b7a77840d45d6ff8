"""Train one configuration and record it in MLflow.  `python src/train.py --help` lists the options."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from descent.config import exit_2_if_refused, register, resume_run, validate
from descent.console import terminal
from descent.tracking import store

register()  # conf/'s ${descent.*:...} resolvers, before Hydra composes and resolves conf/
terminal.quiet_third_parties()  # before MLflow is imported: its log lines through Hydra's (descent/console/terminal.py)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    terminal.quiet_mlflow_prints(hc.verbose)
    with exit_2_if_refused():  # every problem at once, before anything is built and before any MLflow run exists
        validate(cfg)
        uri = store.tracking_uri(cfg.logger.tracking_uri, hc.runtime.cwd)
        store.check_store(uri)
        if cfg.resume:  # the run's own config and checkpoint; the command line may change how it goes on
            cfg, found = resume_run(cfg, hc, uri)

    from descent import pipeline  # MLflow's run machinery and the Trainer: --help and refused input skip them

    resumed = pipeline.Resumed(*found) if cfg.resume else None
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

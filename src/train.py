"""Train one configuration and record it in MLflow.  `python src/train.py --help` lists the options."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("descent")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # lightning's import is the slow part of start-up: only after hydra has parsed the command line
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from descent import tracking
    from descent.model import Classifier

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    choices = {g: hc.runtime.choices[g] for g in tracking.GROUPS if g in hc.runtime.choices}
    pl.seed_everything(cfg.seed, verbose=False)

    datamodule = instantiate(cfg.data, seed=cfg.seed)
    module = Classifier(
        net=instantiate(cfg.model),
        optimizer=instantiate(cfg.optimizer),
        log_every_examples=cfg.trainer.log_every_examples,
        val_every_examples=cfg.trainer.val_every_examples,
        compile_optimizer=cfg.trainer.compile_optimizer,
        flush_denormal=cfg.trainer.flush_denormal,
    )
    logger = tracking.make_logger(
        cfg, choices, hc.runtime.cwd,
        tags={"hydra.output_dir": str(out_dir), "hydra.job.num": str(hc.job.num) if hc.mode.name == "MULTIRUN" else None},
    )
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=logger,
        callbacks=[checkpoint],
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,       # validation happens inside the loop, at fixed intervals in examples
        log_every_n_steps=1,       # metrics bypass self.log; this only silences a warning
        default_root_dir=out_dir,
    )
    tracking.log_config(logger, cfg, choices)

    status = "FAILED"
    try:
        trainer.fit(module, datamodule=datamodule)
        tracking.log_sample_image(logger, datamodule.x_train, datamodule.y_train)
        trainer.test(module, datamodule=datamodule, verbose=False)
        if cfg.logger.log_checkpoint:
            logger.experiment.log_artifact(logger.run_id, checkpoint.last_model_path, "checkpoints")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.end(status)
    log.info("MLflow run %s (%s): %s", logger.run_id, logger._run_name, module.test_metrics)
    return module.test_metrics["test/acc"]


if __name__ == "__main__":
    main()

"""Train one configuration and record it in MLflow.  `python src/train.py --help` lists the options."""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from descent.console import terminal
from descent.config import ConfigError, register, resume_config, validate

log = logging.getLogger("descent")
register()  # conf/'s ${descent.*:...} resolvers, before Hydra composes and resolves conf/
terminal.quiet_third_parties()  # before MLflow is imported: its log lines through Hydra's (descent/console/terminal.py)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    launch_dir, out_dir = hc.runtime.cwd, Path(hc.runtime.output_dir)
    if not hc.verbose:  # MLflow's bar as it downloads a checkpoint to resume from, and its "View run" lines on a
        # server (the closing block names the run's page)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:  # every problem at once, before anything is built and before any MLflow run exists
        validate(cfg)
        from descent.tracking import store

        uri = store.tracking_uri(cfg.logger.tracking_uri, launch_dir)
        store.check_store(uri)
        choices = {g: hc.runtime.choices[g] for g in store.GROUPS if g in hc.runtime.choices}
        run_id = ckpt_path = None
        changed = {}
        if cfg.resume:  # continue a run from its last checkpoint, with its own config, into the same MLflow run
            # (the checkpoint comes from the run's artifacts when this machine lacks its output folder); the
            # command line may change how it goes on (more epochs, what is recorded), not what it measures
            check = partial(resume_config, cfg, dict(hc.runtime.choices), list(hc.overrides.task))
            run_id, out_dir, (cfg, changed), choices = store.find_resume(str(cfg.resume), uri, out_dir, check)
            ckpt_path = out_dir / "checkpoints" / "last.ckpt"
            log.info("resuming MLflow run %s from %s%s", run_id, ckpt_path,
                     "".join(f"; {k}: {a} -> {b}" for k, (a, b) in changed.items()))
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("invalid config, nothing was run:\n%s", e)
        sys.exit(2)
    return train(cfg, hc, launch_dir, out_dir, choices, run_id, ckpt_path, changed)


def train(cfg, hc, launch_dir, out_dir, choices, run_id, ckpt_path, changed=None) -> float | None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LambdaCallback, ModelCheckpoint

    from descent import measure
    from descent.tracking import record
    from descent.engine import threads
    from descent.nets import toy
    from descent.reports import pictures
    from descent.tracking import logger as tracking
    from descent.engine.lightning_private import stop_at_next_chunk
    from descent.engine.loop import Classifier, Diverged
    from descent.engine.state import ResumeError, SafetyCheckpoints
    from descent.sweep.job import Pruned, Pruning, Target, job_tags, optuna_trial

    from descent.config import LR_TAG, lr_not_searched
    from descent.data import DataError
    from descent.nets import SizeError

    multirun = hc.mode == RunMode.MULTIRUN
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data, seed=cfg.seed)
    try:  # the data read and checked, the network sized from it: a bad file is refused before any MLflow run
        datamodule.load()
        module = Classifier.from_config(cfg, datamodule)
    except (DataError, SizeError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("invalid data, nothing was run:\n%s", e)
        if multirun:
            return None  # the sweep goes on with its next job
        sys.exit(2)
    n_train = len(datamodule.x_train) if hasattr(datamodule, "x_train") else None
    threads.apply(cfg, hc, n_train)  # torch's intra-op threads for this job: trainer.threads or descent/engine/threads.py's
    module.measures += measure.from_config(cfg, module.net)  # sharpness, a toy's trace: descent/measure/
    tags = {"hydra.output_dir": str(out_dir)}
    if run_id is None and (not_searched := lr_not_searched(cfg, dict(hc.runtime.choices))):
        log.warning("experiment=%s: %s", hc.runtime.choices.get("experiment"), not_searched)
        tags[LR_TAG] = not_searched
    objective = OmegaConf.select(cfg, "sweep.objective", default="val/loss")  # what this returns
    trial = optuna_trial(hc.sweeper, launch_dir) if multirun else None  # a trial of an Optuna study, or None
    if multirun:
        # the parent run is looked up in the tracking store: a job on another node sees no sweep folder
        tags |= {"hydra.job.num": str(hc.job.num),
                 **job_tags(cfg, launch_dir, hc)}  # mlflow.parentRunId, and a description naming what it varies
    if trial is not None:
        tags |= {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)}
        module.val_hooks.append(Pruning(trial, objective))  # the pruner sees each validation point
    if objective.startswith("target/"):  # the run stops where it reaches the target; it returns the updates
        # (examples) it took; in a study, it stops as pruned once it cannot beat the study's best trial
        module.val_hooks.append(Target(module, cfg.sweep.target_acc, trial, objective,
                                       OmegaConf.select(cfg, "sweep.targets", default=None) or ()))
    logger = tracking.make_logger(cfg, choices, launch_dir, run_id=run_id,
                                  tags=tags if run_id is None else {"hydra.output_dir": str(out_dir)})
    (out_dir / "mlflow_run_id").write_text(logger.run_id)
    if run_id is None:
        tracking.log_config(logger, cfg, choices)
        if n_train is not None:  # what batching=full means for this data (reports/scaling.py reads it)
            logger.log_hyperparams({"data.train_examples": n_train})
    else:
        logger.experiment.update_run(run_id, status="RUNNING")  # also corrects a stale RUNNING/KILLED (or FINISHED)
        if changed:
            tracking.log_resume(logger, cfg, changed)

    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1,
                                 enable_version_counter=False)  # one last.ckpt, also across resumes
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        max_steps=OmegaConf.select(cfg, "trainer.max_updates", default=None) or -1,  # optimizer updates (the loop's)
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=logger,
        callbacks=[LambdaCallback(on_fit_start=partial(  # the line saying what runs (descent/console/terminal.py)
                       terminal.start_line, name=logger.run_name, choices=choices,
                       uri=terminal.shown_uri(cfg.logger.tracking_uri, launch_dir),
                       out_dir=terminal.shown(out_dir, launch_dir))),
                   checkpoint, SafetyCheckpoints(checkpoint, cfg.trainer.checkpoint_every_seconds),
                   tracking.StoreWatch(logger, checkpoint),  # a tracking server away: wait, or stop past a bound
                   # datasets, system metrics, the model after the test; the progress bar in examples
                   *record.callbacks(cfg, hc, logger, choices, resumed=run_id is not None)],
        # checkpoints written off the training thread; then their metric points, then the upload to the run's artifacts
        plugins=[tracking.CheckpointWriter(logger)],
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # validation happens inside the loop, at fixed intervals in examples
        log_every_n_steps=1,  # metrics bypass self.log; this only silences a warning
        default_root_dir=out_dir,
    )

    # Ctrl-C and SIGTERM stop at the next chunk boundary (lightning's SIGTERM path), with a checkpoint;
    # a second Ctrl-C interrupts at once
    received = []

    def stop(signum, frame):
        received.append(signum)
        stop_at_next_chunk(trainer)  # lightning's own SIGTERM path
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if received or trainer.received_sigterm:
            raise SystemExit  # stopped inside the last chunk: lightning ended fit quietly
        if isinstance(module.net, toy.Toy):  # the chapter's other picture: the path on the curve or surface
            pictures.log_trajectory(logger, module.net)
        else:
            tracking.log_sample_image(logger, datamodule.x_train, datamodule.y_train, datamodule.shape)
        trainer.test(module, datamodule=datamodule, verbose=False)
    except Pruned as e:  # the study's pruner stopped this trial: KILLED, as a stop is, and the trial PRUNED
        logger.end("KILLED")
        for key, value in {"optuna.pruned": "true", "optuna.state": "PRUNED"}.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        from optuna.trial import TrialState

        trial.study.tell(trial.number, state=TrialState.PRUNED)
        log.warning("%s; run %s ended KILLED", e, logger.run_id)
        return None
    except Diverged as e:
        logger.end("FAILED")
        for key, value in {"diverged": "true", "diverged.examples": module.examples,
                           "diverged.updates": module.updates,
                           **({"optuna.state": "FAIL"} if trial is not None else {})}.items():
            logger.experiment.set_tag(logger.run_id, key, str(value))
        log.error("diverged: %s; run %s marked FAILED", e, logger.run_id)
        if multirun:
            return None  # the sweep goes on with its next job; the report shows this run as diverged
        sys.exit(3)
    except ResumeError as e:  # the checkpoint does not fit: nothing trained, the run stays resumable
        logger.end("KILLED")
        log.error("cannot resume run %s: %s", logger.run_id, e)
        sys.exit(2)
    except tracking.StoreUnavailable as e:  # the server stayed away: checkpoint kept here, run resumable
        log.error("%s", e)
        sys.exit(75)  # EX_TEMPFAIL
    except SystemExit:  # lightning's SIGTERMException, or our own stop above
        if not (received or trainer.received_sigterm):
            logger.end("FAILED")
            raise
        logger.end("KILLED")
        signum = received[0] if received else signal.SIGTERM
        log.warning("stopped by %s: checkpoint %s; continue with: python %s resume=%s", signal.Signals(signum).name,
                    checkpoint.last_model_path or "(none)", shlex.quote(sys.argv[0]), logger.run_id)
        sys.exit(128 + signum)
    except BaseException:
        logger.end("FAILED")
        raise
    finally:  # the next job of a sweep (or the sweep itself) gets Ctrl-C back
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.end("FINISHED")
    terminal.closing(logger, module.test_metrics, cfg.logger.tracking_uri, launch_dir, module)
    # the objective of a search (the grid sweeper ignores it): a validation metric's last value, never the
    # test set's; None without validation data, NaN when it became NaN: a study records either as a FAIL
    value = module.latest.get(objective)
    if trial is not None:
        state = "COMPLETE" if value is not None and math.isfinite(value) else "FAIL"
        logger.experiment.set_tag(logger.run_id, "optuna.state", state)
    return value


if __name__ == "__main__":
    main()

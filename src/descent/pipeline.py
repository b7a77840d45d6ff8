"""What `python src/train.py` runs, built in one place: `build(cfg, hc)` returns the data, the module with its
measurements, the logger, the callbacks, the plugins and the Trainer; `fit(run)` trains and tests it; ENDINGS says
how each way a run can end becomes its MLflow status, its tags, its log line and its exit status.

`benchmarks/bench.py` times the same build. This module loads Lightning and MLflow (tens of seconds on a loaded
2-core machine): src/train.py imports it only once the config is checked, so that `--help` and refused input
answer at once.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LambdaCallback, ModelCheckpoint

from descent import measure
from descent.config import lr_not_searched
from descent.console import terminal
from descent.data import DataError
from descent.engine import threads
from descent.engine.lightning_private import stop_at_next_chunk
from descent.engine.loop import Classifier, Diverged, flush_subnormals
from descent.engine.state import ResumeError, SafetyCheckpoints
from descent.nets import SizeError, toy
from descent.reports import pictures
from descent.sweep.job import Pruned, Pruning, Target, job_tags, optuna_trial, stop_where_the_study_says
from descent.tracking import checkpoint_io, names, record
from descent.tracking import logger as tracking
from descent.tracking.store import GROUPS

log = logging.getLogger("descent")


@dataclass
class Resumed:
    """A run to continue (store.find_resume): its id, its output folder, its config groups, what the command changed."""

    run_id: str
    out_dir: Path
    choices: dict
    changed: dict = field(default_factory=dict)


@dataclass
class Run:
    """What runs: everything `fit` needs, and what the endings and the closing block read."""

    cfg: DictConfig
    hc: DictConfig
    out_dir: Path
    choices: dict
    data: pl.LightningDataModule
    module: Classifier
    logger: tracking.Logger | None = None
    checkpoint: ModelCheckpoint | None = None
    callbacks: list[pl.Callback] = field(default_factory=list)
    plugins: list = field(default_factory=list)
    trainer: pl.Trainer | None = None
    trial: object | None = None  # the Optuna trial a study's job runs
    resumed: Resumed | None = None
    received: list[int] = field(default_factory=list)  # SIGINT / SIGTERM caught during fit

    @property
    def launch_dir(self) -> str:
        return self.hc.runtime.cwd

    @property
    def multirun(self) -> bool:
        return self.hc.mode == RunMode.MULTIRUN

    @property
    def objective(self) -> str:  # what a search optimises, and what train.py returns
        return OmegaConf.select(self.cfg, "sweep.objective", default=names.VAL_LOSS)


# --- the ways a run ends ----------------------------------------------------------------------------------------


class Stopped(Exception):
    """Ctrl-C or SIGTERM: fit stopped at a chunk boundary with a checkpoint (or lightning's SIGTERMException)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Ending:
    status: str | None  # the MLflow run's end status; None: no run yet, or left as it is (resumable)
    code: int | None  # exit status; None: the job returns None (a study records it)
    say: Callable[[Run | None, BaseException], str]
    level: int = logging.ERROR
    sweep_goes_on: bool = False  # in a sweep the job returns None and the sweep runs its next job
    tags: Callable[[Run, BaseException], dict] = lambda run, e: {}
    full_error: bool = False  # HYDRA_FULL_ERROR=1 shows the traceback instead


def _tell_pruned(run: Run, e: BaseException) -> dict:
    from optuna.trial import TrialState  # optuna is an extra: only a study's trial gets here

    run.trial.study.tell(run.trial.number, state=TrialState.PRUNED)
    return {names.TRIAL_PRUNED: "true", names.TRIAL_STATE: "PRUNED"}


def _diverged(run: Run, e: BaseException) -> dict:
    return {
        names.DIVERGED: "true",
        names.DIVERGED_EXAMPLES: run.module.examples,
        names.DIVERGED_UPDATES: run.module.updates,
        **({names.TRIAL_STATE: "FAIL"} if run.trial else {}),
    }


def _stopped(run: Run, e: Stopped) -> str:
    return (
        f"stopped by {e}: checkpoint {run.checkpoint.last_model_path or '(none)'}; continue with: "
        f"python {shlex.quote(sys.argv[0])} resume={run.logger.run_id}"
    )


_refused = Ending(None, 2, lambda run, e: f"invalid data, nothing was run:\n{e}", sweep_goes_on=True, full_error=True)
ENDINGS: dict[type[BaseException], Ending] = {  # the first class in an exception's MRO found here decides
    DataError: _refused,  # a bad file, or a network that does not fit the data: refused before any MLflow run
    SizeError: _refused,
    Pruned: Ending(
        "KILLED", None, lambda run, e: f"{e}; run {run.logger.run_id} ended KILLED", logging.WARNING, tags=_tell_pruned
    ),  # the study's pruner stopped this trial: KILLED as a stop is, the trial PRUNED
    Diverged: Ending(
        "FAILED",
        3,
        lambda run, e: f"diverged: {e}; run {run.logger.run_id} marked FAILED",
        sweep_goes_on=True,
        tags=_diverged,
    ),  # the report shows the run as diverged
    ResumeError: Ending("KILLED", 2, lambda run, e: f"cannot resume run {run.logger.run_id}: {e}"),  # resumable
    tracking.StoreUnavailable: Ending(None, 75, lambda run, e: str(e)),  # EX_TEMPFAIL: checkpoint kept, resumable
    Stopped: Ending("KILLED", None, _stopped, logging.WARNING),  # exit status 128 + the signal
}


def end(e: BaseException, hc: DictConfig, run: Run | None = None) -> None:
    """End as ENDINGS says for e (run: None before the build made one): the MLflow run's status and tags, the log
    line, then exit, or return None where the caller returns it (a pruned trial, a sweep's job that goes on).
    Anything else ends the run FAILED and is raised again."""
    ending = next((ENDINGS[c] for c in type(e).__mro__ if c in ENDINGS), None)
    if ending is None or (ending.full_error and os.environ.get("HYDRA_FULL_ERROR") == "1"):
        if run is not None:
            run.logger.end("FAILED")
        raise e
    if ending.status:
        run.logger.end(ending.status)
    for key, value in ending.tags(run, e).items():
        run.logger.experiment.set_tag(run.logger.run_id, key, str(value))
    log.log(ending.level, "%s", ending.say(run, e))
    if not (ending.sweep_goes_on and hc.mode == RunMode.MULTIRUN):
        code = 128 + e.signum if isinstance(e, Stopped) else ending.code
        if code is not None:
            sys.exit(code)


# --- the build -------------------------------------------------------------------------------------------------


def build(cfg: DictConfig, hc: DictConfig, resumed: Resumed | None = None, callbacks: tuple = ()) -> Run:
    """The run `python src/train.py` makes from a checked config; `callbacks`: more of them (the bench's clock).
    The data is read and the network sized before any MLflow run exists (DataError, SizeError)."""
    out_dir = resumed.out_dir if resumed else Path(hc.runtime.output_dir)
    choices = resumed.choices if resumed else {g: hc.runtime.choices[g] for g in GROUPS if g in hc.runtime.choices}
    if cfg.trainer.flush_denormal:  # before the data's first parallel op starts torch's threads (they copy it)
        flush_subnormals()
    pl.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data, seed=cfg.seed)
    data.load()
    run = Run(cfg, hc, out_dir, choices, data, Classifier.from_config(cfg, data), resumed=resumed)
    n_train = len(data.x_train) if hasattr(data, "x_train") else None
    threads.apply(cfg, hc, n_train)  # torch's intra-op threads: trainer.threads or descent/engine/threads.py's
    run.module.measures += measure.from_config(cfg, run.module.net)  # sharpness, noise scale, a toy's trace
    run.trial = optuna_trial(hc.sweeper, run.launch_dir) if run.multirun else None
    stop_where_the_study_says(cfg, run.trial)
    run.module.val_hooks += _sweep_hooks(run)
    run.logger = _logger(run, n_train)
    run.checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1, enable_version_counter=False
    )  # one last.ckpt, also across resumes
    run.callbacks = [*_callbacks(run), *callbacks]
    # checkpoints written off the training thread; then their metric points, then the upload to the run's artifacts
    run.plugins = [checkpoint_io.CheckpointWriter(run.logger)]
    run.trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        max_steps=OmegaConf.select(cfg, "trainer.max_updates", default=None) or -1,  # optimizer updates (the loop's)
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=run.logger,
        callbacks=run.callbacks,
        plugins=run.plugins,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # validation happens inside the loop, at fixed intervals in examples
        log_every_n_steps=1,  # metrics bypass self.log; this only silences a warning
        default_root_dir=out_dir,
    )
    return run


def _sweep_hooks(run: Run) -> list:
    """The loop's validation hooks of a study's trial (its pruner) and of a target objective (stop on reaching it)."""
    hooks = [Pruning(run.trial, run.objective)] if run.trial is not None else []
    if run.objective.startswith(names.TARGET):  # the run stops where it reaches the target; it returns the updates
        # (examples) it took; in a study, it stops as pruned once it cannot beat the study's best trial
        hooks.append(
            Target(
                run.module,
                run.cfg.sweep.target_acc,
                run.trial,
                run.objective,
                OmegaConf.select(run.cfg, "sweep.targets", default=None) or (),
            )
        )
    return hooks


def _tags(run: Run) -> dict[str, str]:
    """A new run's tags: its output folder, a preset's unsearched rate, its sweep's parent and its trial."""
    cfg, hc = run.cfg, run.hc
    tags = {names.OUTPUT_DIR: str(run.out_dir)}
    if not_searched := lr_not_searched(cfg, dict(hc.runtime.choices)):
        log.warning("experiment=%s: %s", hc.runtime.choices.get("experiment"), not_searched)
        tags[names.LR_SOURCE] = not_searched
    if run.multirun:  # the parent run is looked up in the tracking store: a job on another node sees no sweep folder
        tags |= {
            names.JOB_NUM: str(hc.job.num),
            **job_tags(cfg, run.launch_dir, hc),
        }  # mlflow.parentRunId, and a description naming what it varies
    if run.trial is not None:
        tags |= {names.STUDY: run.trial.study.study_name, names.TRIAL: str(run.trial.number)}
    return tags


def _logger(run: Run, n_train: int | None) -> tracking.Logger:
    """The MLflow run: a new one with its config, or the resumed one set RUNNING again."""
    resumed = run.resumed
    logger = tracking.make_logger(
        run.cfg,
        run.choices,
        run.launch_dir,
        run_id=resumed and resumed.run_id,
        tags={names.OUTPUT_DIR: str(run.out_dir)} if resumed else _tags(run),
    )
    (run.out_dir / "mlflow_run_id").write_text(logger.run_id)
    if resumed is None:
        tracking.log_config(logger, run.cfg, run.choices)
        if n_train is not None:  # what batching=full means for this data (reports/scaling.py reads it)
            logger.log_hyperparams({names.TRAIN_EXAMPLES: n_train})
    else:
        logger.experiment.update_run(resumed.run_id, status="RUNNING")  # also corrects a stale KILLED or FINISHED
        if resumed.changed:
            tracking.log_resume(logger, run.cfg, resumed.changed)
    return logger


def _callbacks(run: Run) -> list[pl.Callback]:
    """The start line, the checkpoints, the store's watch, the record (datasets, system metrics, model), the bar."""
    cfg, logger = run.cfg, run.logger
    start_line = partial(
        terminal.start_line,
        name=logger.run_name,
        choices=run.choices,
        uri=terminal.shown_uri(cfg.logger.tracking_uri, run.launch_dir),
        out_dir=terminal.shown(run.out_dir, run.launch_dir),
    )
    return [
        LambdaCallback(on_fit_start=start_line),  # the line saying what runs (descent/console/terminal.py)
        run.checkpoint,
        SafetyCheckpoints(run.checkpoint, cfg.trainer.checkpoint_every_seconds),
        checkpoint_io.StoreWatch(logger, run.checkpoint),  # a tracking server away: wait, or stop past a bound
        # datasets, system metrics, the model after the test; the progress bar in examples
        *record.callbacks(cfg, run.hc, logger, run.choices, resumed=run.resumed is not None),
    ]


# --- the run ---------------------------------------------------------------------------------------------------


def fit(run: Run) -> None:
    """Train from the resumed checkpoint (if any), log the chapter's picture, test. Ctrl-C and SIGTERM stop at the
    next chunk boundary (lightning's SIGTERM path) with a checkpoint; a second Ctrl-C interrupts at once."""

    def stop(signum, frame):
        run.received.append(signum)
        stop_at_next_chunk(run.trainer)  # lightning's own SIGTERM path
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    ckpt_path = run.out_dir / "checkpoints" / "last.ckpt" if run.resumed else None
    try:
        run.trainer.fit(run.module, datamodule=run.data, ckpt_path=ckpt_path, weights_only=True)
        if run.received or run.trainer.received_sigterm:
            raise SystemExit  # stopped inside the last chunk: lightning ended fit quietly
        if isinstance(run.module.net, toy.Toy):  # the chapter's other picture: the path on the curve or surface
            pictures.log_trajectory(run.logger, run.module.net)
        else:
            tracking.log_sample_image(run.logger, run.data.x_train, run.data.y_train, run.data.shape)
        run.trainer.test(run.module, datamodule=run.data, verbose=False)
    except SystemExit as e:  # lightning's SIGTERMException, or our own stop above
        if not (run.received or run.trainer.received_sigterm):
            raise
        raise Stopped(run.received[0] if run.received else signal.SIGTERM) from e
    finally:  # the next job of a sweep (or the sweep itself) gets Ctrl-C back
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def finish(run: Run) -> float | None:
    """The run FINISHED, its closing block; the objective of a search (the grid sweeper ignores it): a validation
    metric's last value, never the test set's; None without validation data, NaN when it became NaN (a FAIL)."""
    run.logger.end("FINISHED")
    terminal.closing(run.logger, run.module.test_metrics, run.cfg.logger.tracking_uri, run.launch_dir, run.module)
    value = run.module.latest.get(run.objective)
    if run.trial is not None:
        state = "COMPLETE" if value is not None and math.isfinite(value) else "FAIL"
        run.logger.experiment.set_tag(run.logger.run_id, names.TRIAL_STATE, state)
    return value

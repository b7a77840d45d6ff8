"""MLflow: where runs go, what they record, and metric writes batched off the hot path."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from descent import store
from descent.store import GROUPS, retry

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
PROBE_EVERY = 2.0  # s between looks at an absent server
UNSENT = "unsent_metrics.json"  # beside last.ckpt: points the server never got, for a resume on this machine


class StoreUnavailable(RuntimeError):
    """The tracking server stayed away past logger.outage_seconds; the run stopped with a checkpoint."""


def flatten(cfg: DictConfig) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class Logger(MLFlowLogger):
    """Lightning's MLflow logger, with metric points buffered and written in a few log_batch calls.

    One synchronous DB write per log point would cost more than an epoch of the seed run. Points
    are written when a checkpoint is saved (save(), called by the module; periodic and at epoch
    ends), at the end, and on a crash: what the store holds is always what a checkpoint can resume.
    Each checkpoint is then uploaded to the run's artifacts (UploadCheckpoints), so another machine
    can resume it. The run's final status is set by train.py (FINISHED, FAILED or KILLED), not by lightning.

    A tracking server that goes away does not stop training: points wait in the buffer, checkpoints
    stay local, and StoreWatch looks for the server every few seconds; when it is back, a checkpoint
    save writes the points (exactly once: the buffer only loses what was written) and uploads the
    checkpoint. Past `outage_seconds` the run stops with a checkpoint and the points not written
    saved beside it, for a resume on this machine.
    """

    def __init__(self, *args, outage_seconds: float = 300, upload_checkpoints: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list = []
        self.outage_seconds, self.upload_checkpoints = outage_seconds, upload_checkpoints
        self.away_since: float | None = None  # time.monotonic() of the first write the server missed
        self.unsent_checkpoint: str | None = None  # saved while the server was away
        self.unsent_file: Path | None = None  # points of an earlier outage, written with the first flush

    def log_metrics(self, metrics, step=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items())

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def away_too_long(self) -> bool:
        return self.away and time.monotonic() - self.away_since > self.outage_seconds

    def _went_away(self, what: str) -> bool:
        if not self.away:
            self.away_since = time.monotonic()
            log.warning("the tracking server %s does not answer (%s); training goes on, %d metric points wait "
                        "for it (up to logger.outage_seconds=%g s)", self._tracking_uri, what, len(self.pending),
                        self.outage_seconds)
        return False

    def flush(self) -> bool:
        """Write the waiting points; False (all kept) while the server is away."""
        if (self.pending or self.away) and not store.reachable(self._tracking_uri):
            return self._went_away("writing metrics")
        try:
            while self.pending:  # what was written leaves the buffer; a failure keeps the rest
                retry(self.experiment.log_batch, self.run_id, metrics=self.pending[:MAX_BATCH])
                del self.pending[:MAX_BATCH]
        except Exception as e:
            if store.reachable(self._tracking_uri):
                raise
            return self._went_away(f"{type(e).__name__} writing metrics")
        if self.unsent_file is not None:
            self.unsent_file.unlink(missing_ok=True)
            self.unsent_file = None
        if self.away:
            log.warning("the tracking server is back after %.0f s; the waiting metric points are written",
                        time.monotonic() - self.away_since)
            self.away_since = None
        return True

    def checkpoint_saved(self, path: str) -> None:
        """After each checkpoint file is written (its points were flushed just before): upload it."""
        if not self.upload_checkpoints:
            return
        self.unsent_checkpoint = path
        if self.away or not store.reachable(self._tracking_uri):
            self._went_away("uploading a checkpoint")
            return  # the save that brings the points back uploads it
        try:
            self.experiment.log_artifact(self.run_id, path, "checkpoints")
            self.unsent_checkpoint = None
        except Exception as e:
            if store.reachable(self._tracking_uri):
                log.warning("uploading %s failed (%s: %s); it stays local", path, type(e).__name__, e)
                self.unsent_checkpoint = None
            else:
                self._went_away(f"{type(e).__name__} uploading a checkpoint")

    def wait_for_store(self) -> None:
        """Outside training (start of test, end of run): wait for an absent server, up to the bound."""
        if not self.away and not self.pending and store.reachable(self._tracking_uri):
            return
        while not store.reachable(self._tracking_uri):
            self._went_away("waiting to end the run")
            if self.away_too_long():
                raise self.give_up(self.unsent_checkpoint)
            time.sleep(PROBE_EVERY)
        if self.flush() and self.unsent_checkpoint:
            self.checkpoint_saved(self.unsent_checkpoint)

    def give_up(self, checkpoint: str | None) -> StoreUnavailable:
        """The server stayed away: keep what it never got beside the checkpoint, say how to go on."""
        self._went_away("giving up")
        # test metrics are not kept: a resume from the end-of-training checkpoint tests again
        points = [m for m in self.pending if not m.key.startswith("test/")]
        where = ""
        if checkpoint and points:
            path = Path(checkpoint).parent / UNSENT
            path.write_text(json.dumps([[m.key, m.value, m.timestamp, m.step] for m in points]))
            where = f", {len(points)} metric points it did not get in {path}"
        self.pending = []
        return StoreUnavailable(
            f"the tracking server {self._tracking_uri} has not answered for {time.monotonic() - self.away_since:.0f} s "
            f"(logger.outage_seconds={self.outage_seconds:g}): stopped with the checkpoint {checkpoint or '(none)'}"
            f"{where}. Nothing is lost: when the server is back (make server), continue on this machine with: "
            f"python src/train.py resume={self.run_id}")

    def load_unsent(self, checkpoint_dir: Path) -> None:
        """Points an earlier run of this checkpoint kept when the server stayed away: written first."""
        from mlflow.entities import Metric

        path = Path(checkpoint_dir) / UNSENT
        if path.is_file():
            self.pending[:0] = [Metric(k, v, t, s) for k, v, t, s in json.loads(path.read_text())]
            self.unsent_file = path

    def save(self) -> None:
        pass  # lightning calls this after every training batch; we flush with checkpoints instead

    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        # a crash inside lightning: record it now, the process may not get further
        if self.flush() and status != "success":
            retry(self.experiment.set_terminated, self.run_id, "FAILED")

    def end(self, status: str) -> None:
        if not self._initialized:
            return
        try:
            if status == "FINISHED":
                self.wait_for_store()
            elif not store.reachable(self._tracking_uri):  # a stop (SIGTERM, a failure) is not held up
                raise self.give_up(self.unsent_checkpoint)
        except StoreUnavailable as e:
            log.error("%s", e)
            if status == "FINISHED":
                raise SystemExit(75) from None  # as train.py exits when the bound passes in training
            return  # the caller says how the run ended; the server will show it RUNNING until resumed
        self.flush()
        retry(self.experiment.set_terminated, self.run_id, status)


class UploadCheckpoints(TorchCheckpointIO):
    """Every checkpoint file, once written (periodic, epoch end, on a stop), goes to the run's artifacts."""

    def __init__(self, logger: Logger):
        super().__init__()
        self.logger = logger

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.logger.checkpoint_saved(str(path))


class StoreWatch(pl.Callback):
    """While the server is away: look for it every few seconds; when back, save a checkpoint (which
    writes the waiting points and uploads it); past the bound, stop with a checkpoint."""

    def __init__(self, logger: Logger, checkpoint):
        self.logger, self.checkpoint = logger, checkpoint
        self.last_probe = 0.0

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.logger.away or time.monotonic() - self.last_probe < PROBE_EVERY:
            return
        self.last_probe = time.monotonic()
        back = store.reachable(self.logger._tracking_uri)
        if back or self.logger.away_too_long():
            path = os.path.join(self.checkpoint.dirpath, "last.ckpt")
            trainer.save_checkpoint(path, weights_only=False)  # flushes (module hook) and uploads
            self.checkpoint.last_model_path = path
            if not back and self.logger.away:
                raise self.logger.give_up(path)


def run_name(choices: dict[str, str], seed: int) -> str:
    return f"{choices.get('optimizer', 'opt')}-{choices.get('batching', 'batch')}-s{seed}"


def make_logger(cfg: DictConfig, choices: dict[str, str], launch_dir: str, tags: dict[str, str],
                run_id: str | None = None, out_dir: str | Path | None = None) -> Logger:
    """A new run, or (run_id given) the run being resumed from the checkpoint in out_dir."""
    tags = {k: v for k, v in tags.items() if v is not None}
    if store.is_server(cfg.logger.tracking_uri):
        # MLflow's client retries a refused connection for ~4 min by default, blocking the caller (a
        # thread of system metrics, a callback); outages are this logger's job (buffer, then the bound)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # ~20 s: rides out a server restart
    commit = store.git_commit(launch_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    logger = Logger(
        experiment_name=cfg.logger.experiment_name,
        run_name=run_name(choices, cfg.seed),
        tracking_uri=store.tracking_uri(cfg.logger.tracking_uri, launch_dir),
        tags=tags,
        run_id=run_id,
        outage_seconds=cfg.logger.outage_seconds,
        upload_checkpoints=cfg.logger.log_checkpoint,
    )
    if run_id is None:
        from mlflow import MlflowClient

        # the experiment exists before lightning looks it up (parallel jobs race to create it)
        logger._experiment_id = store.experiment_id(MlflowClient(logger._tracking_uri), cfg.logger.experiment_name)
    else:
        for key, value in tags.items():
            logger.experiment.set_tag(run_id, key, value)
        if out_dir is not None:
            logger.load_unsent(Path(out_dir) / "checkpoints")
    return logger


def log_config(logger: Logger, cfg: DictConfig, choices: dict[str, str]) -> None:
    params = {g: choices[g] for g in GROUPS if g in choices}
    params.update(flatten(cfg))
    logger.log_hyperparams(params)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_sample_image(logger: Logger, x, y, index: int = 4) -> None:
    """The book's picture: plt.imshow(train_images[4], cmap=plt.cm.binary)."""
    logger.wait_for_store()  # training is over: a server still away is waited for here, up to the bound
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(x[index].reshape(28, 28).cpu().numpy(), cmap=plt.cm.binary)
    ax.set_title(f"train image {index}: label {int(y[index])}")
    ax.axis("off")
    logger.experiment.log_figure(logger.run_id, fig, f"train_image_{index}.png")
    plt.close(fig)

"""MLflow: where runs go, what they record, and metric writes batched off the hot path."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

from descent.engine import threads
from descent.tracking import names, store
from descent.tracking.mlflow_private import logger_started
from descent.tracking.store import GROUPS, retry

if TYPE_CHECKING:  # for an annotation: checkpoint_io imports this module
    from descent.tracking.checkpoint_io import CheckpointWriter

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
PROBE_EVERY = 2.0  # s between looks at an absent server


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

    One synchronous DB write per log point would cost more than an epoch of the seed run. Points wait
    in `pending`; each checkpoint carries the points still waiting when it was taken, and they are
    written after its file is on disk (by CheckpointWriter, off the training thread), then the file is
    uploaded to the run's artifacts so another machine can resume it. Writes are idempotent: per key,
    the logger knows the last step the store has (read from the store on resume) and never writes a
    point at or below it. So a SIGKILL at any instant leaves neither a duplicate nor a gap: a point
    in the store is never written again, and a point not yet in the store is in the newest checkpoint
    on disk, or is re-computed by training from an older one. The run's final status is set by
    train.py (FINISHED, FAILED or KILLED), not by lightning.

    A tracking server that goes away does not stop training: points wait in the buffer (and in each
    checkpoint), checkpoints stay local, and StoreWatch looks for the server every few seconds; when it
    is back, a checkpoint save writes the points and uploads the checkpoint. Past `outage_seconds` the
    run stops with a checkpoint that carries every point the server did not get, for a resume on this
    machine.
    """

    def __init__(
        self,
        experiment_name: str,
        run_name: str,
        tracking_uri: str,
        *args,
        outage_seconds: float = 300,
        upload_checkpoints: bool = True,
        **kwargs,
    ):
        super().__init__(experiment_name, run_name, tracking_uri, *args, **kwargs)
        # what it was made with, public (Lightning's own copies are private)
        self.experiment_name, self.run_name, self.tracking_uri = experiment_name, run_name, tracking_uri
        self.pending: list = []
        self.sent: dict[str, int] = {}  # per key, the last step the store has
        self.lock = threading.Lock()  # pending is appended by training and pruned by the checkpoint writer
        self.writer: CheckpointWriter | None = None
        self.outage_seconds, self.upload_checkpoints = outage_seconds, upload_checkpoints
        self.away_since: float | None = None  # time.monotonic() of the first write the server missed
        self.unsent_checkpoint: str | None = None  # saved while the server was away

    def log_metrics(self, metrics, step=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        with self.lock:
            self.pending.extend(points)

    def unsent(self) -> list[list]:
        """The points waiting to be written, as plain lists: what a checkpoint carries."""
        with self.lock:
            return [[m.key, m.value, m.timestamp, m.step] for m in self.pending]

    def resume(self, points: list[list]) -> None:
        """Continue a run: learn what the store has, then queue the checkpoint's points it lacks."""
        from mlflow.entities import Metric

        keys = [k for k in retry(self.experiment.get_run, self.run_id).data.metrics if not k.startswith(names.SYSTEM)]
        for key in keys:  # system/* are MLflow's own, written by its monitor, not through this logger
            history = retry(self.experiment.get_metric_history, self.run_id, key)
            self.sent[key] = max((m.step for m in history), default=-1)
        missing = [Metric(k, v, t, s) for k, v, t, s in points if s > self.sent.get(k, -1)]
        with self.lock:
            self.pending[:0] = missing
        if missing:
            log.info(
                "%d metric points of the checkpoint were not in the store yet; they are written first", len(missing)
            )

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def away_too_long(self) -> bool:
        return self.away and time.monotonic() - self.away_since > self.outage_seconds

    def _went_away(self, what: str) -> bool:
        if not self.away:
            self.away_since = time.monotonic()
            log.warning(
                "the tracking server %s does not answer (%s); training goes on, %d metric points wait "
                "for it (up to logger.outage_seconds=%g s)",
                self.tracking_uri,
                what,
                len(self.pending),
                self.outage_seconds,
            )
        return False

    def flush(self) -> bool:
        """Write every waiting point now; False (all kept) while the server is away."""
        with self.lock:
            points = list(self.pending)
        return self.send(points)

    def send(self, points: list) -> bool:
        """Write those of `points` the store lacks; False (all kept) while the server is away."""
        points = [m for m in points if m.step > self.sent.get(m.key, -1)]
        if (points or self.away) and not store.reachable(self.tracking_uri):
            return self._went_away("writing metrics")
        try:
            for i in range(0, len(points), MAX_BATCH):  # what was written leaves the buffer; a failure keeps the rest
                batch = points[i : i + MAX_BATCH]
                retry(self.experiment.log_batch, self.run_id, metrics=batch)
                for m in batch:
                    self.sent[m.key] = max(self.sent.get(m.key, -1), m.step)
        except Exception as e:
            if store.reachable(self.tracking_uri):
                raise
            return self._went_away(f"{type(e).__name__} writing metrics")
        finally:
            with self.lock:
                self.pending = [m for m in self.pending if m.step > self.sent.get(m.key, -1)]
        if self.away:
            log.warning(
                "the tracking server is back after %.0f s; the waiting metric points are written",
                time.monotonic() - self.away_since,
            )
            self.away_since = None
        return True

    def checkpoint_written(self, path: str, points: list[list]) -> None:
        """A checkpoint file is on disk: write the points it carries, then upload it (the writer's thread)."""
        from mlflow.entities import Metric

        self.send([Metric(*p) for p in points])
        self.upload(path)  # while the server is away it only remembers the path, for the save that finds it back

    def upload(self, path: str) -> None:
        if not self.upload_checkpoints:
            return
        self.unsent_checkpoint = path
        if self.away or not store.reachable(self.tracking_uri):
            self._went_away("uploading a checkpoint")
            return  # the save that brings the points back uploads it
        try:
            self.experiment.log_artifact(self.run_id, path, "checkpoints")
            self.unsent_checkpoint = None
        except Exception as e:
            if store.reachable(self.tracking_uri):
                log.warning("uploading %s failed (%s: %s); it stays local", path, type(e).__name__, e)
                self.unsent_checkpoint = None
            else:
                self._went_away(f"{type(e).__name__} uploading a checkpoint")

    def drain(self) -> None:
        """Wait for the checkpoint being written (and its points and upload), if any."""
        if self.writer is not None:
            self.writer.wait()

    def wait_for_store(self) -> None:
        """Outside training (start of test, end of run): wait for an absent server, up to the bound."""
        self.drain()
        if not self.away and not self.pending and store.reachable(self.tracking_uri):
            return
        while not store.reachable(self.tracking_uri):
            self._went_away("waiting to end the run")
            if self.away_too_long():
                raise self.give_up(self.unsent_checkpoint)
            time.sleep(PROBE_EVERY)
        if self.flush() and self.unsent_checkpoint:
            self.upload(self.unsent_checkpoint)

    def give_up(self, checkpoint: str | None) -> StoreUnavailable:
        """The server stayed away: the checkpoint carries what it never got; say how to go on."""
        self.drain()
        self._went_away("giving up")
        # test metrics are not carried: a resume from the end-of-training checkpoint tests again
        waiting = sum(not m.key.startswith(names.TEST) for m in self.pending)
        where = f", with the {waiting} metric points it did not get" if checkpoint and waiting else ""
        self.pending = []
        return StoreUnavailable(
            f"the tracking server {self.tracking_uri} has not answered for {time.monotonic() - self.away_since:.0f} s "
            f"(logger.outage_seconds={self.outage_seconds:g}): stopped with the checkpoint {checkpoint or '(none)'}"
            f"{where}. Nothing is lost: when the server is back (make server), continue on this machine with: "
            f"python src/train.py resume={self.run_id}"
        )

    def save(self) -> None:
        pass  # lightning calls this after every training batch; we write with checkpoints instead

    def finalize(self, status: str = "success") -> None:
        if not logger_started(self):
            return
        # a crash inside lightning: record it now, the process may not get further
        if status != "success" and self.flush():
            retry(self.experiment.set_terminated, self.run_id, "FAILED")

    def end(self, status: str) -> None:
        if not logger_started(self):
            return
        try:
            if status == "FINISHED":
                self.wait_for_store()
            else:
                self.drain()  # a stop waits for the checkpoint in flight: resume-anywhere holds
                if not store.reachable(self.tracking_uri):  # but is not held up by an absent server
                    raise self.give_up(self.unsent_checkpoint)
        except StoreUnavailable as e:
            log.error("%s", e)
            if status == "FINISHED":
                raise SystemExit(75) from None  # as train.py exits when the bound passes in training
            return  # the caller says how the run ended; the server will show it RUNNING until resumed
        self.flush()
        retry(self.experiment.set_terminated, self.run_id, status)


def run_name(choices: dict[str, str], seed: int) -> str:
    return f"{choices.get('optimizer', 'opt')}-{choices.get('batching', 'batch')}-s{seed}"


def make_logger(
    cfg: DictConfig, choices: dict[str, str], launch_dir: str, tags: dict[str, str], run_id: str | None = None
) -> Logger:
    """A new run, or (run_id given) the run being resumed."""
    tags = {k: v for k, v in tags.items() if v is not None}
    if store.is_server(cfg.logger.tracking_uri):
        # MLflow's client retries a refused connection for ~4 min by default, blocking the caller (a
        # thread of system metrics, a callback); outages are this logger's job (buffer, then the bound)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # ~20 s: rides out a server restart
    commit = store.git_commit(launch_dir)
    if commit:
        tags[names.GIT_COMMIT] = commit
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

        # the experiment exists before lightning looks it up (parallel jobs race to create it): lightning finds it
        store.experiment_id(MlflowClient(logger.tracking_uri), cfg.logger.experiment_name)
    else:
        for key, value in tags.items():
            logger.experiment.set_tag(run_id, key, value)
    return logger


def log_config(logger: Logger, cfg: DictConfig, choices: dict[str, str]) -> None:
    params = {g: choices[g] for g in GROUPS if g in choices}
    params.update(flatten(cfg))
    params.update(threads.params())  # torch.threads, omp.wait_policy: what this process runs with
    logger.log_hyperparams(params)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_resume(logger: Logger, cfg: DictConfig, changed: dict) -> None:
    """A resume that changed keys (config.RESUME_MAY_CHANGE, e.g. more epochs). MLflow params cannot be
    changed: they keep the values the run started with. The tag resume.overrides lists each such resume's
    changes (`trainer.max_epochs: 5 -> 10`, appended with `; `), and config.yaml becomes the config run
    now, which the next resume (the printed command) reads: a run extended and then stopped goes on to its
    new end."""
    client = logger.experiment
    now = ", ".join(f"{key}: {was} -> {given}" for key, (was, given) in changed.items())
    before = client.get_run(logger.run_id).data.tags.get(names.RESUME_OVERRIDES)
    client.set_tag(logger.run_id, names.RESUME_OVERRIDES, f"{before}; {now}" if before else now)
    client.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_sample_image(logger: Logger, x, y, shape: tuple[int, ...], index: int = 4) -> None:
    """The book's picture: plt.imshow(train_images[4], cmap=plt.cm.binary); a colour image in colour; none
    for feature vectors (shape (D,)) or a training set too small to have that example."""
    logger.wait_for_store()  # training is over: a server still away is waited for here, up to the bound
    if len(shape) != 3 or len(x) <= index:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    image = x[index].reshape(shape).cpu().numpy()
    if shape[0] == 1:
        ax.imshow(image[0], cmap=plt.cm.binary)
    else:  # channels first in memory, last for imshow
        ax.imshow(image.transpose(1, 2, 0).clip(0, 1) if shape[0] == 3 else image[0], cmap=plt.cm.binary)
    ax.set_title(f"train image {index}: label {int(y[index])}")
    ax.axis("off")
    logger.experiment.log_figure(logger.run_id, fig, f"train_image_{index}.png")
    plt.close(fig)

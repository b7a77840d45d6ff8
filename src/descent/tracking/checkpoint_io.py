"""The run's checkpoints as its record: written off the training thread (CheckpointWriter), then the metric points
each carries written and the file uploaded (UploadCheckpoints, through the Logger), and one saved as soon as an
absent tracking server is back or past its bound (StoreWatch)."""

from __future__ import annotations

import os
import threading
import time

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from descent.tracking import store
from descent.tracking.logger import PROBE_EVERY, Logger


class UploadCheckpoints(TorchCheckpointIO):
    """Write a checkpoint file; once it is on disk, write the metric points it carries and upload it."""

    def __init__(self, logger: Logger):
        super().__init__()
        self.logger = logger

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)  # atomic: a temporary file, then a rename
        self.logger.checkpoint_written(str(path), checkpoint.get("descent", {}).get("points", []))


class CheckpointWriter(AsyncCheckpointIO):
    """Checkpoints off the training thread: lightning's AsyncCheckpointIO (tensors cloned on the training
    thread, one writer thread), with at most one checkpoint waiting: a newer one replaces it, as it
    carries the same points and a later state. A stop, the end of fit and the end of the run wait for it.
    """

    def __init__(self, logger: Logger):
        super().__init__(UploadCheckpoints(logger))
        self.newest: tuple | None = None
        self.slot = threading.Lock()
        logger.writer = self

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self._ensure_setup()
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())
        with self.slot:
            self.newest = (snapshot, path, storage_options)
        self._executor.submit(self._write_newest)
        if self._error:
            raise self._error

    def _write_newest(self) -> None:
        with self.slot:
            job, self.newest = self.newest, None
        if job is None:  # a newer checkpoint took this one's place and is written already
            return
        try:
            self.checkpoint_io.save_checkpoint(*job)
        except BaseException as e:
            self._error = e

    def wait(self) -> None:
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        if self._error:
            error, self._error = self._error, None
            raise error


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
        back = store.reachable(self.logger.tracking_uri)
        if back or self.logger.away_too_long():
            path = os.path.join(self.checkpoint.dirpath, "last.ckpt")
            trainer.save_checkpoint(path, weights_only=False)  # its points are written, then it is uploaded
            self.checkpoint.last_model_path = path
            if not back and self.logger.away:
                raise self.logger.give_up(path)

"""The lightning module that trains a network, one update per batch_size examples: its segment loop, log points,
validation and measurements (the update steps: descent/engine/steps.py; checkpoint state: descent/engine/state.py)."""

from __future__ import annotations

import logging
import math
import os
import time
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from descent import nets
from descent.data import epoch_permutation
from descent.engine import cadence, graphs, state, steps
from descent.engine.best import Best
from descent.engine.lightning_private import count_updates
from descent.engine.steps import segments
from descent.measure import Point
from descent.tracking import names


def seconds_since_process_start() -> float:
    """Wall time since this process was created (Linux /proc; elsewhere since this module was imported)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
_FIRST_FIT = True
log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def flush_subnormals() -> None:
    """Flush subnormal floats to zero from now on (trainer.flush_denormal), as TensorFlow does by default: RMSprop's
    decaying averages reach them, which made its online-SGD step 1.6x slower here; only values below 1e-38 change.
    The flag is the calling thread's: OpenMP's threads copy it when they start, so call this before the first
    parallel op (pipeline.build does; a thread started earlier keeps subnormals, tests/test_threads.py)."""
    np.finfo(np.float32), np.finfo(np.float64)  # cache numpy's limits first, or it warns about FTZ
    torch.set_flush_denormal(True)


class Classifier(pl.LightningModule):
    """Manual optimization: lightning hands over chunks of examples, the updates happen here.

    Lightning's per-step machinery (~1.5 ms here) would dominate online SGD, so it runs once per
    chunk; inside, one segment loop cuts the chunk at update boundaries and hands each piece to the
    run's step (eager, closure or graph: descent/engine/steps.py), which trains on it.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        log_every_examples: int = 1200,
        val_every_examples: int | None = None,
        val_every_share: float | None = None,
        compile_optimizer: bool = False,
        flush_denormal: bool = True,
        cuda_graphs: bool | str = "auto",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.automatic_optimization = False
        self.net, self.make_optimizer = net, optimizer
        self.log_every, self.val_every, self.val_share = log_every_examples, val_every_examples, val_every_share
        self.compile_optimizer, self.flush_denormal = compile_optimizer, flush_denormal
        self.cuda_graphs = cuda_graphs  # "auto", True or False: see descent/engine/graphs.py
        self.step = None  # how a piece of a chunk trains (descent/engine/steps.py): chosen at fit start
        self.datamodule = None  # what it trains on: the trainer's, handed over at setup
        # progress, kept in the checkpoint so a resumed run continues the same axes (descent/engine/state.py)
        self.examples = 0  # training examples seen: the step of every logged metric
        self.updates = 0
        self.evaluations = 0  # the batch's loss and gradient evaluated: once per update, or as often as a closure asks
        self.train_seconds = 0.0
        self.last_val_step = -1
        self.epoch_offset = 0  # examples of epoch offset_epoch already trained on
        self.offset_epoch = 0
        self.epoch_closed = True
        self.latest: dict[str, float] = {}  # each metric's newest value, for the terminal (descent/console/progress.py)
        self.resumed: dict | None = None  # the descent part of the checkpoint being resumed
        self.best = Best()  # best/val_loss, best/val_acc (best/train_loss without validation): descent/engine/best.py
        self.val_hooks: list = []  # called with (examples, {"val/loss": .., "val/acc": ..}) at each validation
        # point, after it is logged; an Optuna trial's pruner listens here (descent/sweep/job.py, Pruning)
        self.measures: list = []  # measurements of the optimisation (descent/measure/): each is called with a
        # descent.measure.Point at every validation point and returns {metric: value}, logged at step = examples
        # seen; they read the weights and never change them (nor the gradients, the optimizer or the random state)
        # the loss: the net's own (the MLP's model.loss, descent/nets/networks.py; a toy loss's, descent/nets/toy.py: one loss
        # per example, no accuracy), else cross-entropy on class scores; each with F.cross_entropy's signature
        self.criterion = getattr(net, "criterion", F.cross_entropy)
        self.classifies = getattr(net, "classifies", True)  # class scores: val/acc, the MLflow model

    @classmethod
    def from_config(cls, cfg, datamodule=None) -> "Classifier":
        """The module as conf/ describes it, the network sized from the data (src/train.py and the benchmark
        build it this way)."""
        return cls(
            net=nets.build(cfg.model, datamodule),
            optimizer=instantiate(cfg.optimizer),
            log_every_examples=cfg.trainer.log_every_examples,
            val_every_examples=cfg.trainer.val_every_examples,
            val_every_share=cfg.trainer.get("val_every_share"),
            compile_optimizer=cfg.trainer.compile_optimizer,
            flush_denormal=cfg.trainer.flush_denormal,
            cuda_graphs=cfg.trainer.cuda_graphs,
        )

    @property
    def graph(self) -> graphs.GraphStep | None:
        """The graph path's step when the run updates through it (descent/engine/graphs.py), else None."""
        return self.step if isinstance(self.step, graphs.GraphStep) else None

    @property
    def opt_step(self):
        """The eager step's optimizer step: torch's, or compiled (trainer.compile_optimizer); the benchmark wraps
        it to time the compilation."""
        return self.step.opt_step

    @opt_step.setter
    def opt_step(self, step) -> None:
        self.step.opt_step = step

    def configure_optimizers(self):
        capture = graphs.wanted(self.cuda_graphs, self.device) and self.device.type == "cuda"
        # named: descent.nets.optim.MuonAdamW picks its groups by name; torch's optimizers record the names
        return self.make_optimizer(self.net.named_parameters(), **graphs.optimizer_kwargs(self.make_optimizer, capture))

    def forward(self, x):
        return self.net(x)

    # -- training -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # the data this module trains on, from the trainer once; it tells the data where an epoch starts (the
        # example after the last one trained on: a resumed run goes on with the same order)
        self.datamodule = self.trainer.datamodule
        self.datamodule.position = lambda: (self.offset_epoch, self.epoch_offset)

    def on_fit_start(self) -> None:
        if self.flush_denormal:  # pipeline.build has set it already, before any thread of torch's pool started
            flush_subnormals()
        self.opt = self.optimizers().optimizer  # the raw torch optimizer: no wrapper cost per update
        dm = self.datamodule
        # trainer.compile_optimizer: one fused kernel instead of ~5 passes (RMSprop: 0.29 -> 0.06 ms a step)
        opt_step = torch.compile(self.opt.step) if self.compile_optimizer else self.opt.step
        self.step = steps.choose(
            self.net, self.opt, self.criterion, dm.x_train, dm.y_train, self.cuda_graphs, self.device, opt_step
        )
        if self.graph is not None and self.graph.capture:  # batches are gathered by index inside the graph, so
            # chunks only pace lightning (~1.5 ms of its machinery each): one per epoch; signals and timed
            # checkpoints are then served at epoch ends (0.1 s apart for the seed run, a few s for online SGD)
            dm.whole_set_chunks()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state.load(self, checkpoint, self.trainer.ckpt_path)

    def on_train_start(self) -> None:
        global _FIRST_FIT
        if _FIRST_FIT:  # start-up cost: only meaningful for the first run of a process (a sweep runs many)
            _FIRST_FIT = False
            log.info("first update %.2f s after the process started", seconds_since_process_start())
        dm = self.datamodule
        # examples per epoch: the training set, or its whole batches under data.drop_last (no partial update)
        self.n_train, self.batch_size = getattr(dm, "epoch_length", len(dm.x_train)), dm.updates_batch_size
        # trainer.max_updates (lightning's max_steps, checked between chunks): the run ends at that update
        self.max_updates = self.trainer.max_steps if self.trainer.max_steps > 0 else math.inf
        self.opt.zero_grad(set_to_none=True)
        graphs.match_capturable(self.opt, self.graph is not None and self.graph.capture)  # after a checkpoint's load
        self.window = steps.Window()
        self.best.watch(validation=len(dm.x_val) > 0)
        if self.resumed is not None:
            state.restore(self, self.resumed, self.trainer.ckpt_path)
            self.resumed = None
        self._prepare()  # lightning resuming mid-epoch skips on_train_epoch_start

    def on_train_epoch_start(self) -> None:
        self._prepare()

    def _prepare(self) -> None:
        """Find the next example (reconciling a resumed position with lightning's epoch) and the next log points."""
        self.epoch_pos = self.epoch_offset
        self.next_log = (self.examples // self.log_every + 1) * self.log_every
        self.next_val = cadence.next_point(self.examples, self.val_every, self.val_share)
        self.tic = time.perf_counter()
        epoch = self.current_epoch
        if not state.at_epoch(self.offset_epoch, self.epoch_offset, epoch, self.n_train, self.trainer.ckpt_path):
            if not self.epoch_closed:  # lightning resumed past an epoch end it never ran
                self._close_epoch()
            self.offset_epoch, self.epoch_offset, self.epoch_pos = epoch, 0, 0
        dm = self.datamodule  # a step that gathers by position gets the epoch's order on the device: the whole
        # set's permutation (drop_last trains on its first n_train); the graph path moves the window's sums there
        perm = epoch_permutation(len(dm.x_train), dm.seed, epoch, self.device) if self.step.by_position else None
        self.window = self.step.start_epoch(perm, self.window, pending=self.epoch_offset % self.batch_size)
        self.tic = time.perf_counter()

    def training_step(self, chunk, chunk_idx):
        # the one segment loop of every step: locals for the counters, the step's own work per piece
        x, y = chunk
        segment, offset, length = self.step.segment, self.epoch_offset, len(x)
        examples, updates, updates_before = self.examples, self.updates, self.updates
        self.epoch_closed = False
        for a, b, batch_len, ends_batch in segments(offset, length, self.n_train, self.batch_size):
            self.evaluations += segment(x, y, a, b, batch_len, ends_batch, offset)
            examples += b - a
            if ends_batch:
                updates += 1
                if self._after_update(examples, updates, offset + b, batch_len):
                    length = b
                    break
        self._end_chunk(examples, updates, updates - updates_before, offset + length)

    def _after_update(self, examples: int, updates: int, epoch_pos: int, batch_len: int) -> bool:
        """Every step's end of an update: a log point at every log_every examples, at each update when updates
        are rarer than that, and at each validation point. True when a validation hook stopped the run there
        (sweep.Target), or when the run's budget in updates is spent (the epoch's end then logs and
        validates there): the chunk ends at this update."""
        if examples >= self.next_log or batch_len >= self.log_every or examples >= self.next_val:
            self._log_point(examples, updates, epoch_pos, batch_len)
            return self.trainer.should_stop or updates >= self.max_updates
        return updates >= self.max_updates

    def _end_chunk(self, examples: int, updates: int, steps: int, epoch_pos: int) -> None:
        count_updates(self.trainer, steps)  # trainer.global_step, max_steps and step-based checkpointing see them
        self.examples, self.updates = examples, updates
        self.epoch_offset = self.epoch_pos = epoch_pos

    def _log_point(self, examples: int, updates: int, epoch_pos: int, batch_len: int) -> None:
        self.examples, self.updates, self.epoch_pos = examples, updates, epoch_pos
        if examples >= self.next_log or batch_len >= self.log_every:
            self._log_train()
        if examples >= self.next_val:
            self._validate()

    def on_train_epoch_end(self) -> None:
        self._close_epoch()

    def _close_epoch(self) -> None:
        if self.window.n:
            self._log_train()
        if self.last_val_step != self.examples:
            self._validate()
        self.epoch_closed = True

    def _clock(self) -> float:
        now = time.perf_counter()
        self.train_seconds += now - self.tic
        self.tic = now
        return self.train_seconds

    def _log_train(self) -> None:
        loss, acc = self.window.pop()
        self.record(
            {
                names.TRAIN_LOSS: loss,
                **({names.TRAIN_ACC: acc} if self.classifies else {}),
                names.EPOCH: self.offset_epoch + self.epoch_pos / self.n_train,
                names.UPDATES: self.updates,
                names.EVALUATIONS: self.evaluations,
                names.SECONDS: self._clock(),
            }
        )
        if not math.isfinite(loss):  # the point above is recorded: the report marks where it happened
            raise Diverged(f"{names.TRAIN_LOSS} became {loss} after {self.examples} examples ({self.updates} updates)")
        while self.next_log <= self.examples:
            self.next_log += self.log_every

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
        was_training = self.net.training
        self.net.eval()
        loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
        for i in range(0, len(x), chunk):
            logits = self.net(x[i : i + chunk])
            loss += self.criterion(logits, y[i : i + chunk], reduction="sum")
            if self.classifies:
                correct += (logits.argmax(1) == y[i : i + chunk]).sum()
        self.net.train(was_training)
        return loss.item() / len(x), correct.item() / len(x)

    def _validate(self) -> None:
        dm = self.datamodule
        self._clock()  # validation time is not training time
        metrics = {}
        if len(dm.x_val):
            loss, acc = self.evaluate(dm.x_val, dm.y_val)
            self.record(metrics := {names.VAL_LOSS: loss, **({names.VAL_ACC: acc} if self.classifies else {})})
        # what the measurements measure (not training time either); latest is the live record: a measurement
        # sees this point's val/acc, and the metrics of the measurements before it
        point = Point(
            net=self.net,
            criterion=self.criterion,
            optimizer=self.opt,
            x_train=dm.x_train,
            y_train=dm.y_train,
            updates=self.updates,
            examples=self.examples,
            latest=self.latest,
        )
        for measure in self.measures:
            self.record(measure(point))
        self.last_val_step = self.examples
        self.tic = time.perf_counter()
        self.next_val = cadence.next_point(self.examples, self.val_every, self.val_share)
        for hook in self.val_hooks:
            hook(self.examples, metrics)

    def on_test_epoch_start(self) -> None:
        self.test_loss = torch.zeros((), device=self.device)
        self.test_correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.test_n = 0
        self.test_logits = []  # the test set's class scores, in order, for descent/reports/errors.py

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.test_loss += self.criterion(logits, y, reduction="sum")
        if self.classifies:
            self.test_correct += (logits.argmax(1) == y).sum()
            self.test_logits.append(logits.detach())
        self.test_n += len(x)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = {names.TEST_LOSS: self.test_loss.item() / self.test_n}
        if self.classifies:
            self.test_metrics[names.TEST_ACC] = self.test_correct.item() / self.test_n
        self.record(self.test_metrics)

    def record(self, metrics: dict[str, float]) -> None:
        """Log these metrics at step = training examples seen (every metric of every regime), with the best/* points
        they set; a validation hook records its own here (sweep.Target: target/*)."""
        self.latest.update(metrics)
        metrics = metrics | self.best(metrics)  # best/* when this point improves on them
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.examples)

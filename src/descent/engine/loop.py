"""The lightning module that trains a network, one update per batch_size examples, and its helpers."""

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
from pytorch_lightning.callbacks import Checkpoint
from torch import nn

from descent.engine import graphs
from descent.engine.best import Best
from descent.data import epoch_permutation
from descent.nets.optim import needs_closure


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


class ResumeError(RuntimeError):
    """A checkpoint that does not fit the run it is asked to continue."""


def segments(offset: int, length: int, n: int, batch_size: int):
    """Split examples [offset, offset+length) of an n-example epoch at update boundaries.

    Yields (start, stop, batch_len, ends_batch) relative to the chunk: each segment lies inside one
    batch; batch_len is that batch's size (the last batch of an epoch may be partial) and
    ends_batch says whether the optimizer steps after it.
    """
    if not (0 <= offset <= offset + length <= n) or batch_size < 1:
        raise ValueError(f"examples [{offset}, {offset + length}) in batches of {batch_size} do not lie "
                         f"inside an epoch of {n} examples")
    pos, end = offset, offset + length
    while pos < end:  # each turn moves pos forward: pos < end <= n, so batch_stop > pos
        batch_start = pos - pos % batch_size
        batch_stop = min(batch_start + batch_size, n)
        stop = min(batch_stop, end)
        yield pos - offset, stop - offset, batch_stop - batch_start, stop == batch_stop
        pos = stop


class SafetyCheckpoints(Checkpoint):
    """last.ckpt at every epoch end, every `seconds` of training (so SIGKILL loses little) and when
    SIGINT/SIGTERM stops the run (lightning raises SIGTERMException between chunks).

    A Checkpoint, so lightning calls its on_train_epoch_end after the module's (the epoch's last train
    point and validation are in the checkpoint). ModelCheckpoint with save_top_k=0 writes no epoch-end
    last.ckpt in lightning 2.6: it saves "last" only after a top-k save.
    """

    def __init__(self, checkpoint, seconds: float):
        self.checkpoint, self.seconds = checkpoint, seconds
        self.last = time.monotonic()

    def _save(self, trainer) -> None:
        path = os.path.join(self.checkpoint.dirpath, "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # with the optimizer state, to resume
        self.checkpoint.last_model_path = path
        self.last = time.monotonic()

    def on_train_batch_end(self, trainer, *args) -> None:
        if time.monotonic() - self.last >= self.seconds:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)


# what a checkpoint must carry so that a resumed run continues the same axes and data order:
# the next example is epoch_offset of epoch offset_epoch; epoch_closed says whether that epoch's
# end (its last train point and validation) has been logged
PROGRESS = ("examples", "updates", "train_seconds", "last_val_step", "epoch_offset", "offset_epoch", "epoch_closed")
# what the data must match for a checkpoint to be resumed (same examples, same order, same updates)
DATA_KEYS = ("n_train", "val_size", "limit_train", "batch_size", "drop_last")


def data_signature(dm) -> dict:
    return {"n_train": len(dm.x_train), "val_size": dm.val_size, "limit_train": dm.limit_train,
            "batch_size": dm.updates_batch_size, "drop_last": getattr(dm, "drop_last", False)}


class Window:
    """Training loss and accuracy since the last log point, reduced only when it is logged."""

    def __init__(self, loss_sum: float = 0.0, correct: int = 0, n: int = 0):
        self.losses, self.weights, self.preds, self.targets = [], [], [], []
        self.carried = (loss_sum, correct)  # from a checkpoint written inside this window
        self.n = n

    def add(self, loss, weight, logits, targets) -> None:
        self.losses.append(loss)
        self.weights.append(weight)
        if logits.dim() == 2:  # class scores; a toy loss (descent/nets/toy.py) gives one loss per example, no accuracy
            self.preds.append(logits.detach().argmax(1))
            self.targets.append(targets)
        self.n += len(targets)

    def state(self) -> dict:
        """Sums so far: a checkpoint written inside a window carries them, so no example is lost."""
        loss_sum, correct = self.carried
        if self.losses:
            losses = torch.stack(self.losses)
            weights = torch.tensor(self.weights, dtype=losses.dtype, device=losses.device)
            loss_sum += float(losses @ weights)
            if self.preds:
                correct += int((torch.cat(self.preds) == torch.cat(self.targets)).sum())
        return {"loss_sum": loss_sum, "correct": correct, "n": self.n}

    def pop(self) -> tuple[float, float]:
        state = self.state()
        self.__init__()
        return state["loss_sum"] / state["n"], state["correct"] / state["n"]


class Classifier(pl.LightningModule):
    """Manual optimization: lightning hands over chunks of examples, the updates happen here.

    Lightning's per-step machinery (~1.5 ms here) would dominate online SGD, so it runs once per
    chunk; inside, each update is the plain loop: forward, loss, backward, step.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        log_every_examples: int = 1200,
        val_every_examples: int | None = None,
        compile_optimizer: bool = False,
        flush_denormal: bool = True,
        cuda_graphs: bool | str = "auto",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.automatic_optimization = False
        self.net, self.make_optimizer = net, optimizer
        self.log_every, self.val_every = log_every_examples, val_every_examples
        self.compile_optimizer, self.flush_denormal = compile_optimizer, flush_denormal
        self.cuda_graphs = cuda_graphs  # "auto", True or False: see descent/engine/graphs.py
        self.graph: graphs.GraphStep | None = None
        # progress, kept in the checkpoint so a resumed run continues the same axes
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
        # point, after it is logged; an Optuna trial's pruner listens here (descent/sweep/driver.py, Pruning)
        self.measures: list = []  # measurements of the optimisation (descent/measure/): each is called with this
        # module at every validation point and returns {metric: value}, logged at step = examples seen; they
        # read the weights and never change them (nor the gradients, the optimizer or the random state)
        # the loss: the net's own (the MLP's model.loss, descent/nets/networks.py; a toy loss's, descent/nets/toy.py: one loss
        # per example, no accuracy), else cross-entropy on class scores; each with F.cross_entropy's signature
        self.criterion = getattr(net, "criterion", F.cross_entropy)
        self.classifies = getattr(net, "classifies", True)  # class scores: val/acc, the MLflow model

    @classmethod
    def from_config(cls, cfg, datamodule=None) -> "Classifier":
        """The module as conf/ describes it, the network sized from the data (src/train.py and the benchmark
        build it this way)."""
        from hydra.utils import instantiate

        from descent import nets

        return cls(
            net=nets.build(cfg.model, datamodule),
            optimizer=instantiate(cfg.optimizer),
            log_every_examples=cfg.trainer.log_every_examples,
            val_every_examples=cfg.trainer.val_every_examples,
            compile_optimizer=cfg.trainer.compile_optimizer,
            flush_denormal=cfg.trainer.flush_denormal,
            cuda_graphs=cfg.trainer.cuda_graphs,
        )

    def configure_optimizers(self):
        capture = graphs.wanted(self.cuda_graphs, self.device) and self.device.type == "cuda"
        # named: descent.nets.optim.MuonAdamW picks its groups by name; torch's optimizers record the names
        return self.make_optimizer(self.net.named_parameters(), **graphs.optimizer_kwargs(self.make_optimizer, capture))

    def forward(self, x):
        return self.net(x)

    # -- training -----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.trainer.datamodule.position = lambda: (self.offset_epoch, self.epoch_offset)
        if self.flush_denormal:
            np.finfo(np.float32), np.finfo(np.float64)  # cache numpy's limits first, or it warns about FTZ
            # as TensorFlow does by default: RMSprop's decaying averages reach subnormal floats, which
            # made its online-SGD step 1.6x slower here; flushing them changes values below 1e-38 only
            torch.set_flush_denormal(True)
        self.opt = self.optimizers().optimizer  # the raw torch optimizer: no wrapper cost per update
        self.opt_step = self.opt.step
        if self.compile_optimizer:  # one fused kernel instead of ~5 passes (RMSprop: 0.29 -> 0.06 ms a step)
            self.opt_step = torch.compile(self.opt.step)
        self.closure = needs_closure(type(self.opt))  # L-BFGS: _train_closure
        if self.closure and graphs.wanted(self.cuda_graphs, self.device):
            # its step runs the closure a data-dependent number of times and reads the loss on the host to
            # decide (line search, tolerances): no fixed sequence of kernels for a graph to record
            log.info("updates eagerly: %s's step calls a closure, which a CUDA graph cannot capture",
                     type(self.opt).__name__)
        elif graphs.wanted(self.cuda_graphs, self.device) and self.criterion is F.cross_entropy:  # the graph path: descent/engine/graphs.py
            dm, capture = self.trainer.datamodule, self.device.type == "cuda"
            self.graph = graphs.GraphStep(self.net, self.opt, dm.x_train, dm.y_train, capture=capture)
            log.info("updates through descent.engine.graphs.GraphStep (%s)",
                     "one CUDA graph per batch size" if capture else f"uncaptured: {self.device.type}")
            if capture:  # batches are gathered by index inside the graph, so chunks only pace lightning
                # (~1.5 ms of its machinery each): one per epoch; signals and timed checkpoints are then
                # served at epoch ends (0.1 s apart for the seed run, a few s for online SGD)
                dm.whole_set_chunks()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        grads = [p.grad for p in self.net.parameters()]  # a batch larger than a chunk, half accumulated
        checkpoint["descent"] = {k: getattr(self, k) for k in PROGRESS} | {
            "evaluations": self.evaluations,
            "window": self.window.state(),
            "grads": None if all(g is None for g in grads) else grads,
            "data": data_signature(self.trainer.datamodule),
            # the metric points not yet in the store: written once this file is on disk (descent/tracking/logger.py)
            "points": [p for logger in self.loggers for p in getattr(logger, "unsent", list)()],
            "measures": {type(m).__name__: m.state_dict() for m in self.measures if hasattr(m, "state_dict")},
            "best": self.best.state_dict(),
            # what a validation hook has done so far (sweep.Target: the targets already logged)
            "hooks": {type(h).__name__: h.state_dict() for h in self.val_hooks if hasattr(h, "state_dict")},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("descent", {})
        missing = [k for k in (*PROGRESS, "window", "grads", "data") if k not in state]
        if missing:
            raise ResumeError(f"checkpoint {self.trainer.ckpt_path} lacks {', '.join(missing)} (written by an "
                              "older descent?): it cannot be resumed exactly")
        for k in PROGRESS:
            setattr(self, k, state[k])
        self.evaluations = state.get("evaluations", self.updates)  # older checkpoints: one evaluation per update
        self.resumed = state
        self.best.load_state_dict(state.get("best", {}))  # checkpoints from before best/* have none
        saved = state.get("measures", {})  # checkpoints from before measurements have none: they start afresh
        for m in self.measures:
            if type(m).__name__ in saved and hasattr(m, "load_state_dict"):
                m.load_state_dict(saved[type(m).__name__])
        hooks = state.get("hooks", {})
        for h in self.val_hooks:
            if type(h).__name__ in hooks and hasattr(h, "load_state_dict"):
                h.load_state_dict(hooks[type(h).__name__])

    def on_train_start(self) -> None:
        global _FIRST_FIT
        if _FIRST_FIT:  # start-up cost: only meaningful for the first run of a process (a sweep runs many)
            _FIRST_FIT = False
            log.info("first update %.2f s after the process started", seconds_since_process_start())
        dm = self.trainer.datamodule
        # examples per epoch: the training set, or its whole batches under data.drop_last (no partial update)
        self.n_train, self.batch_size = getattr(dm, "epoch_length", len(dm.x_train)), dm.updates_batch_size
        # trainer.max_updates (lightning's max_steps, checked between chunks): the run ends at that update
        self.max_updates = self.trainer.max_steps if self.trainer.max_steps > 0 else math.inf
        self.opt.zero_grad(set_to_none=True)
        graphs.match_capturable(self.opt, self.graph is not None and self.graph.capture)  # after a checkpoint's load
        self.window = Window()
        self.best.watch(validation=len(dm.x_val) > 0)
        if self.resumed is not None:
            self._restore(self.resumed)
            self.resumed = None
        self._prepare()  # lightning resuming mid-epoch skips on_train_epoch_start

    def _restore(self, state: dict) -> None:
        found = data_signature(self.trainer.datamodule)
        recorded = {"drop_last": False} | state["data"]  # checkpoints from before drop_last trained on every example
        differ = [f"{k} {recorded[k]} in the checkpoint, {found[k]} now" for k in DATA_KEYS if recorded[k] != found[k]]
        if differ:
            raise ResumeError(f"checkpoint {self.trainer.ckpt_path} was written for other data: " + "; ".join(differ))
        self.window = Window(**state["window"])
        for logger in self.loggers:  # the store may lack the checkpoint's last points, or have later ones
            if hasattr(logger, "resume"):
                logger.resume(state.get("points", []))
        if state["grads"] is not None:
            for p, g in zip(self.net.parameters(), state["grads"]):
                p.grad = None if g is None else g.to(p.device)

    def on_train_epoch_start(self) -> None:
        self._prepare()

    def _prepare(self) -> None:
        """Find the next example (reconciling a resumed position with lightning's epoch) and the next log points."""
        self.epoch_pos = self.epoch_offset
        self.next_log = (self.examples // self.log_every + 1) * self.log_every
        self.next_val = (self.examples // self.val_every + 1) * self.val_every if self.val_every else math.inf
        self.tic = time.perf_counter()
        epoch = self.current_epoch
        if self.offset_epoch != epoch:
            if not (self.offset_epoch == epoch - 1 and self.epoch_offset == self.n_train):
                raise ResumeError(f"checkpoint {self.trainer.ckpt_path}: it stopped at example {self.epoch_offset} "
                                  f"of epoch {self.offset_epoch} ({self.n_train} per epoch), lightning resumes epoch "
                                  f"{epoch}; the two do not fit together")
            if not self.epoch_closed:  # lightning resumed past an epoch end it never ran
                self._close_epoch()
            self.offset_epoch, self.epoch_offset, self.epoch_pos = epoch, 0, 0
        if self.graph is not None:  # the epoch's order on the device; the window's sums move there too
            dm = self.trainer.datamodule  # the whole set's permutation: drop_last trains on its first n_train
            perm = epoch_permutation(len(dm.x_train), dm.seed, self.current_epoch, self.device)
            self.window = self.graph.start_epoch(perm, self.window, pending=self.epoch_offset % self.batch_size)
        self.tic = time.perf_counter()

    def training_step(self, chunk, chunk_idx):
        if self.graph is not None:
            return self._train_graphed(len(chunk[0]))
        if self.closure:
            return self._train_closure(*chunk)
        # the hot loop: locals only, two small ops of bookkeeping per update (loss.detach, argmax)
        x, y = chunk
        net, opt, step, window, cross_entropy = self.net, self.opt, self.opt_step, self.window, self.criterion
        examples, offset, updates, length = self.examples, self.epoch_offset, self.updates, len(x)
        updates_before = updates
        self.epoch_closed = False
        for a, b, batch_len, ends_batch in segments(offset, len(x), self.n_train, self.batch_size):
            xb, yb = x[a:b], y[a:b]
            logits = net(xb)
            if b - a == batch_len:  # the whole batch in one piece: the common case
                loss = cross_entropy(logits, yb)
                loss.backward()
                window.add(loss.detach(), batch_len, logits, yb)
            else:  # a piece of a batch larger than a chunk: accumulate the batch's mean gradient
                loss = cross_entropy(logits, yb, reduction="sum")
                (loss / batch_len).backward()
                window.add(loss.detach(), 1, logits, yb)
            examples += b - a
            if ends_batch:
                step()
                opt.zero_grad(set_to_none=True)
                updates += 1
                if self._after_update(examples, updates, offset + b, batch_len):
                    length = b
                    break
        self._end_chunk(examples, updates, updates - updates_before, offset + length)

    def _train_graphed(self, length: int) -> None:
        # the graph path: the same segments and log points as training_step, but the chunk's examples
        # are not read: each update gathers its whole batch by epoch position (a full batch spanning
        # several chunks is one update at its last piece, on data already on the device)
        graph, examples, offset, updates = self.graph, self.examples, self.epoch_offset, self.updates
        updates_before = updates
        self.epoch_closed = False
        for a, b, batch_len, ends_batch in segments(offset, length, self.n_train, self.batch_size):
            examples += b - a
            if ends_batch:
                graph.update(offset + b - batch_len, offset + b)
                updates += 1
                if self._after_update(examples, updates, offset + b, batch_len):
                    length = b
                    break
        self._end_chunk(examples, updates, updates - updates_before, offset + length)

    def _train_closure(self, x, y) -> None:
        # a closure-based optimizer (L-BFGS): its step evaluates the batch's loss and gradient itself, as
        # often as its line search needs, so nothing is computed per piece. A batch that lies in the chunk
        # is read from it; one spanning several chunks (a full batch) is gathered at its last piece from
        # the training set by epoch position, as the graph path does: no gradient is half-accumulated
        # between chunks, and a checkpoint there resumes by evaluating the batch whole
        examples, offset, updates, length = self.examples, self.epoch_offset, self.updates, len(x)
        updates_before = updates
        self.epoch_closed = False
        for a, b, batch_len, ends_batch in segments(offset, length, self.n_train, self.batch_size):
            examples += b - a
            if ends_batch:
                if b - a == batch_len:
                    pieces = [(x[a:b], y[a:b])]
                else:
                    dm = self.trainer.datamodule
                    perm = epoch_permutation(len(dm.x_train), dm.seed, self.current_epoch, self.device)
                    index = perm[offset + b - batch_len : offset + b].split(len(x))  # chunk-sized pieces
                    pieces = [(dm.x_train[i], dm.y_train[i]) for i in index]
                self.opt.step(self._closure(pieces, batch_len))
                self.opt.zero_grad(set_to_none=True)  # as the eager loop: a checkpoint here holds no gradient
                updates += 1
                if self._after_update(examples, updates, offset + b, batch_len):
                    length = b
                    break
        self._end_chunk(examples, updates, updates - updates_before, offset + length)

    def _closure(self, pieces: list, batch_len: int):
        """The batch's mean loss with its gradient in .grad; the first evaluation (at the weights before
        the step, as every other optimizer's train/loss) goes into the metric window."""
        first = [True]

        def closure():
            self.opt.zero_grad(set_to_none=True)
            total = 0.0
            for xb, yb in pieces:
                logits = self.net(xb)
                if len(pieces) == 1:  # the plain loop's mean, bit for bit
                    loss = self.criterion(logits, yb)
                    weight = batch_len
                else:
                    loss = self.criterion(logits, yb, reduction="sum") / batch_len
                    weight = batch_len  # the window sums loss * weight: this piece's sum
                loss.backward()
                total += loss.detach()
                if first[0]:
                    self.window.add(loss.detach(), weight, logits, yb)
            first[0] = False
            self.evaluations += 1
            return total

        return closure

    def _after_update(self, examples: int, updates: int, epoch_pos: int, batch_len: int) -> bool:
        """Every path's end of an update: a log point at every log_every examples, at each update when updates
        are rarer than that, and at each validation point. True when a validation hook stopped the run there
        (sweep.Target), or when the run's budget in updates is spent (the epoch's end then logs and
        validates there): the chunk ends at this update."""
        if examples >= self.next_log or batch_len >= self.log_every or examples >= self.next_val:
            self._log_point(examples, updates, epoch_pos, batch_len)
            return self.trainer.should_stop or updates >= self.max_updates
        return updates >= self.max_updates

    def _end_chunk(self, examples: int, updates: int, steps: int, epoch_pos: int) -> None:
        # lightning counts optimizer steps only through its own wrapper; tell it ours, so that
        # trainer.global_step, max_steps and step-based checkpointing work
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(steps)
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
        self._log({
            "train/loss": loss,
            **({"train/acc": acc} if self.classifies else {}),
            "progress/epoch": self.offset_epoch + self.epoch_pos / self.n_train,
            "progress/updates": self.updates,
            "progress/evaluations": self.evaluations if self.closure else self.updates,
            "progress/seconds": self._clock(),
        })
        if not math.isfinite(loss):  # the point above is recorded: the report marks where it happened
            raise Diverged(f"train/loss became {loss} after {self.examples} examples ({self.updates} updates)")
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
        dm = self.trainer.datamodule
        self._clock()  # validation time is not training time
        metrics = {}
        if len(dm.x_val):
            loss, acc = self.evaluate(dm.x_val, dm.y_val)
            self._log(metrics := {"val/loss": loss, **({"val/acc": acc} if self.classifies else {})})
        for measure in self.measures:  # not training time either
            self._log(measure(self))
        self.last_val_step = self.examples
        self.tic = time.perf_counter()
        while self.next_val <= self.examples:
            self.next_val += self.val_every
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
        self.test_metrics = {"test/loss": self.test_loss.item() / self.test_n}
        if self.classifies:
            self.test_metrics["test/acc"] = self.test_correct.item() / self.test_n
        self._log(self.test_metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        # step = training examples seen, for every metric of every regime (see DESIGN.md)
        self.latest.update(metrics)
        metrics = metrics | self.best(metrics)  # best/* when this point improves on them
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.examples)

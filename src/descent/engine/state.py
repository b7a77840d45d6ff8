"""What a checkpoint holds of a run beyond lightning's own, how a resume fits it to the run it continues, and when
checkpoints are written (SafetyCheckpoints).

The loop's part of a checkpoint is checkpoint["descent"]: its position and axes (PROGRESS), the metric window and
any half-accumulated gradient, the data it was written for (DATA_KEYS), the metric points not yet in the store, and
the state of its measurements, best/* and validation hooks. A resume reads it back in two steps, as lightning
allows: `load` when lightning restores the module (before the optimizer exists), `restore` once training starts
(the data on its device, the loggers ready); `at_epoch` then fits the position to the epoch lightning resumes.
"""

from __future__ import annotations

import os
import time

from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from descent.engine.steps import Window

# what a checkpoint must carry so that a resumed run continues the same axes and data order:
# the next example is epoch_offset of epoch offset_epoch; epoch_closed says whether that epoch's
# end (its last train point and validation) has been logged
PROGRESS = ("examples", "updates", "train_seconds", "last_val_step", "epoch_offset", "offset_epoch", "epoch_closed")
# what the data must match for a checkpoint to be resumed (same examples, same order, same updates)
DATA_KEYS = ("n_train", "val_size", "limit_train", "batch_size", "drop_last")


class ResumeError(RuntimeError):
    """A checkpoint that does not fit the run it is asked to continue."""


def data_signature(dm) -> dict:
    return {
        "n_train": len(dm.x_train),
        "val_size": dm.val_size,
        "limit_train": dm.limit_train,
        "batch_size": dm.updates_batch_size,
        "drop_last": getattr(dm, "drop_last", False),
    }


def _states(objects) -> dict:
    return {type(o).__name__: o.state_dict() for o in objects if hasattr(o, "state_dict")}


def _load_states(objects, saved: dict) -> None:
    for o in objects:
        if type(o).__name__ in saved and hasattr(o, "load_state_dict"):
            o.load_state_dict(saved[type(o).__name__])


def save(module, checkpoint: dict) -> None:
    """The module's part of a checkpoint (LightningModule.on_save_checkpoint)."""
    grads = [p.grad for p in module.net.parameters()]  # a batch larger than a chunk, half accumulated
    checkpoint["descent"] = {k: getattr(module, k) for k in PROGRESS} | {
        "evaluations": module.evaluations,
        "window": module.window.state(),
        "grads": None if all(g is None for g in grads) else grads,
        "data": data_signature(module.datamodule),
        # the metric points not yet in the store: written once this file is on disk (descent/tracking/checkpoint_io.py)
        "points": [p for logger in module.loggers for p in getattr(logger, "unsent", list)()],
        "measures": _states(module.measures),
        "best": module.best.state_dict(),
        # what a validation hook has done so far (sweep.Target: the targets already logged)
        "hooks": _states(module.val_hooks),
    }


def load(module, checkpoint: dict, path) -> None:
    """Position, axes, best/*, measurements and hooks from a checkpoint (LightningModule.on_load_checkpoint);
    the rest waits for `restore`, once training starts."""
    state = checkpoint.get("descent", {})
    missing = [k for k in (*PROGRESS, "window", "grads", "data") if k not in state]
    if missing:
        raise ResumeError(
            f"checkpoint {path} lacks {', '.join(missing)} (written by an older descent?): it cannot be resumed exactly"
        )
    for k in PROGRESS:
        setattr(module, k, state[k])
    # every update evaluates its batch at least once; checkpoints from before the count (none) or that counted
    # only a closure's evaluations (0 for every other optimizer) hold fewer: one per update then
    module.evaluations = max(state.get("evaluations", 0), module.updates)
    module.resumed = state
    module.best.load_state_dict(state.get("best", {}))  # checkpoints from before best/* have none
    _load_states(module.measures, state.get("measures", {}))  # from before measurements: they start afresh
    _load_states(module.val_hooks, state.get("hooks", {}))


def restore(module, state: dict, path) -> None:
    """The rest of a checkpoint, once training starts: refused when written for other data; else the metric
    window, the loggers' unsent points and a half-accumulated gradient."""
    found = data_signature(module.datamodule)
    recorded = {"drop_last": False} | state["data"]  # checkpoints from before drop_last trained on every example
    differ = [f"{k} {recorded[k]} in the checkpoint, {found[k]} now" for k in DATA_KEYS if recorded[k] != found[k]]
    if differ:
        raise ResumeError(f"checkpoint {path} was written for other data: " + "; ".join(differ))
    module.window = Window(**state["window"])
    for logger in module.loggers:  # the store may lack the checkpoint's last points, or have later ones
        if hasattr(logger, "resume"):
            logger.resume(state.get("points", []))
    if state["grads"] is not None:
        for p, g in zip(module.net.parameters(), state["grads"]):
            p.grad = None if g is None else g.to(p.device)


def at_epoch(offset_epoch: int, epoch_offset: int, epoch: int, n_train: int, path) -> bool:
    """Whether the loop's position (example epoch_offset of epoch offset_epoch) is in lightning's epoch: True; False
    when it is the end of the epoch before (a checkpoint written there: lightning resumes the next one); a
    ResumeError for any other."""
    if offset_epoch == epoch:
        return True
    if offset_epoch == epoch - 1 and epoch_offset == n_train:
        return False
    raise ResumeError(
        f"checkpoint {path}: it stopped at example {epoch_offset} of epoch {offset_epoch} ({n_train} "
        f"per epoch), lightning resumes epoch {epoch}; the two do not fit together"
    )


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
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)

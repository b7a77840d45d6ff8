"""The parts of Lightning (2.6) that descent reaches without a public API, in one place: each says why, and what
public API would replace it. Nothing else in descent touches Lightning's private attributes or its loops' insides.
"""

from __future__ import annotations


def count_updates(trainer, updates: int) -> None:
    """Tell lightning about optimizer steps taken outside its LightningOptimizer wrapper, so that trainer.global_step,
    max_steps (trainer.max_updates) and step-based checkpointing see them.

    Under manual optimization lightning counts a step only when LightningOptimizer.step() runs (its hooks wrap every
    call); the loop steps the raw torch optimizer (descent/engine/loop.py: the wrapper's per-step machinery would
    dominate online SGD), so it reports its updates once per chunk here. Would be replaced by a public Trainer or
    LightningModule method that adds optimizer steps taken outside the wrapper (none in lightning 2.6: global_step is
    read-only, and the loop's progress tracker is reached through its internal _TrainingEpochLoop and
    _ManualOptimization).
    """
    trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(updates)


def stop_at_next_chunk(trainer) -> None:
    """Stop fit as lightning's own SIGTERM handler does: at the next chunk boundary, through SIGTERMException
    (SafetyCheckpoints writes last.ckpt there; the epoch is not closed).

    src/train.py's handler calls it for SIGINT and SIGTERM. Lightning sets this flag only from the SIGTERM handler
    it installs during fit, and trainer.received_sigterm is read-only; the public trainer.should_stop ends the epoch
    instead, running its end (a train point and a validation the run never reached). Would be replaced by a public,
    settable Trainer flag or method that requests the SIGTERM stop path.
    """
    trainer._signal_connector.received_sigterm = True

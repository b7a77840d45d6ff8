"""src/train.py, with a real signal delivered to the process itself at a chosen point of training.

A test's way to make a stop land exactly on a chunk boundary of its choosing (a signal sent from
outside lands wherever the process happens to be). Nothing else changes: the entry point, its signal
handlers, lightning's stop path and the checkpoints are the real ones.

  DESCENT_STOP_AT=250,1000     examples seen after which to stop (the first one not yet passed is used)
  DESCENT_STOP_SIGNALS=SIGTERM,SIGINT   the signal for each of them
  DESCENT_KILL_AFTER_SAVE=1000  SIGKILL right after a checkpoint is written at this many examples
  DESCENT_SIGINT_AFTER_JOB=0    SIGINT (Ctrl-C) right after this job of a basic-launcher sweep returns
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import hydra.core.utils

from descent.loop import Classifier

env = os.environ
targets = [int(v) for v in env.get("DESCENT_STOP_AT", "").split(",") if v]
signals = [signal.Signals[s] for s in env.get("DESCENT_STOP_SIGNALS", "").split(",") if s]
kill_after_save = int(env.get("DESCENT_KILL_AFTER_SAVE", "-1"))
sigint_after_job = int(env.get("DESCENT_SIGINT_AFTER_JOB", "-1"))

training_step, save_checkpoint = Classifier.training_step, pl.Trainer.save_checkpoint


def stopping_training_step(self, chunk, chunk_idx):
    before = self.examples
    out = training_step(self, chunk, chunk_idx)
    for target, signum in zip(targets, signals):
        if before < target <= self.examples:
            assert target == self.examples, f"stop point {target} is not a chunk boundary"
            os.kill(os.getpid(), signum)
    return out


def killing_save_checkpoint(self, *args, **kwargs):
    save_checkpoint(self, *args, **kwargs)
    module = self.lightning_module
    if module.examples == kill_after_save and module.epoch_closed:
        os.kill(os.getpid(), signal.SIGKILL)


def interrupted_run_job(*args, config, **kwargs):
    ret = run_job(*args, config=config, **kwargs)
    if config.hydra.job.num == sigint_after_job:
        os.kill(os.getpid(), signal.SIGINT)
    return ret


# hydra's plugin scan loads the basic launcher afresh, which then imports run_job from here
run_job = hydra.core.utils.run_job
hydra.core.utils.run_job = interrupted_run_job
Classifier.training_step = stopping_training_step
pl.Trainer.save_checkpoint = killing_save_checkpoint
train_py = Path(__file__).resolve().parents[1] / "src" / "train.py"
sys.argv[0] = str(train_py)
sys.path.insert(0, str(train_py.parent))
runpy.run_path(str(train_py), run_name="__main__")

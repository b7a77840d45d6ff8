"""src/train.py, with a real signal delivered to the process itself at a chosen point of training.

A test's way to make a stop land exactly on a chunk boundary of its choosing (a signal sent from
outside lands wherever the process happens to be). Nothing else changes: the entry point, its signal
handlers, lightning's stop path and the checkpoints are the real ones.

  DESCENT_STOP_AT=250,1000     examples seen after which to stop (the first one not yet passed is used)
  DESCENT_STOP_SIGNALS=SIGTERM,SIGINT   the signal for each of them
  DESCENT_KILL_AT=written:1000  SIGKILL in the writing of the epoch-end checkpoint at this many examples:
                                written = its file is on disk, its metric points not yet in the store;
                                sent = its points are in the store, its upload not done; saved = all done
  DESCENT_SIGINT_AFTER_JOB=0    SIGINT (Ctrl-C) right after this job of a basic-launcher sweep returns
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import hydra.core.utils

from descent.tracking import checkpoint_io
from descent.tracking import logger as tracking
from descent.engine.loop import Classifier

env = os.environ
targets = [int(v) for v in env.get("DESCENT_STOP_AT", "").split(",") if v]
signals = [signal.Signals[s] for s in env.get("DESCENT_STOP_SIGNALS", "").split(",") if s]
kill_stage, _, kill_examples = env.get("DESCENT_KILL_AT", ":-1").partition(":")
sigint_after_job = int(env.get("DESCENT_SIGINT_AFTER_JOB", "-1"))

training_step = Classifier.training_step
save_checkpoint = checkpoint_io.UploadCheckpoints.save_checkpoint
checkpoint_written, upload = tracking.Logger.checkpoint_written, tracking.Logger.upload


def stopping_training_step(self, chunk, chunk_idx):
    before = self.examples
    out = training_step(self, chunk, chunk_idx)
    for target, signum in zip(targets, signals):
        if before < target <= self.examples:
            assert target == self.examples, f"stop point {target} is not a chunk boundary"
            os.kill(os.getpid(), signum)
    return out


def kill_if(stage, logger):
    if stage == kill_stage and getattr(logger, "kill_here", False):
        os.kill(os.getpid(), signal.SIGKILL)


def killing_save_checkpoint(self, checkpoint, path, storage_options=None):  # the writer's thread
    state = checkpoint["descent"]
    self.logger.kill_here = state["examples"] == int(kill_examples) and state["epoch_closed"]
    save_checkpoint(self, checkpoint, path, storage_options)
    kill_if("saved", self.logger)


def killing_checkpoint_written(self, path, points):
    kill_if("written", self)
    checkpoint_written(self, path, points)


def killing_upload(self, path):
    kill_if("sent", self)
    upload(self, path)


def interrupted_run_job(*args, config, **kwargs):
    ret = run_job(*args, config=config, **kwargs)
    if config.hydra.job.num == sigint_after_job:
        os.kill(os.getpid(), signal.SIGINT)
    return ret


# hydra's plugin scan loads the basic launcher afresh, which then imports run_job from here
run_job = hydra.core.utils.run_job
hydra.core.utils.run_job = interrupted_run_job
Classifier.training_step = stopping_training_step
checkpoint_io.UploadCheckpoints.save_checkpoint = killing_save_checkpoint
tracking.Logger.checkpoint_written, tracking.Logger.upload = killing_checkpoint_written, killing_upload
train_py = Path(__file__).resolve().parents[1] / "src" / "train.py"
sys.argv[0] = str(train_py)
sys.path.insert(0, str(train_py.parent))
runpy.run_path(str(train_py), run_name="__main__")

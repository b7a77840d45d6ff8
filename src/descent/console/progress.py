"""The terminal's progress: one bar per epoch in examples, with examples/s and the latest metrics.

Lightning's bars count what it hands the module, chunks of 8192 examples ("1/3 [00:35<01:10, 0.03it/s]"),
and flash empty ones ("Training: 0/?", "Testing DataLoader 0"). This one counts examples, as Keras' `fit`
does, and ends each epoch's line with that epoch's last train and validation metrics. It is Lightning's
progress-bar slot (so Lightning adds none of its own) holding a plain tqdm bar, opened at the first chunk
Lightning hands over or at the epoch's end, whichever comes first: a resumed run enters an epoch part-way,
or at its end, without on_train_epoch_start, and the bar starts where the run stands.

On a terminal the bar is redrawn in place. Without one (a file, a cluster job, parallel jobs of a sweep
sharing one screen, a terminal that reports 0 columns) it logs a plain line every `every_seconds` and at
each epoch's end, which reads well in Hydra's log file and interleaves no carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pytorch_lightning.callbacks.progress import ProgressBar
from tqdm import tqdm

from descent.console.terminal import metric_text
from descent.tracking import names

log = logging.getLogger(__name__)


def terminal_columns(stream=None) -> int:
    """Columns of the terminal `stream` (stdout) is, $COLUMNS first; 0 when it is none or reports none."""
    stream = stream or sys.stdout
    try:
        if not stream.isatty():
            return 0
        if os.environ.get("COLUMNS", "").isdigit():
            return int(os.environ["COLUMNS"])
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class ExamplesProgressBar(ProgressBar):
    def __init__(self, name: str = "", live: bool | None = None, every_seconds: float = 30):
        super().__init__()
        self.name, self.every_seconds = name, every_seconds
        self.live = terminal_columns() > 0 if live is None else live  # redraw in place, or log lines
        self.enabled = True
        self.epoch = None  # the epoch whose bar is open
        self.bar = None

    @classmethod
    def for_job(cls, hc, name: str) -> "ExamplesProgressBar":
        """Live on a terminal, unless parallel jobs of a sweep (joblib, ray, slurm) share it."""
        return cls(name, live=terminal_columns() > 0 and hc.runtime.choices.get("hydra/launcher") in (None, "basic"))

    # lightning's ProgressBar interface
    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args, **kwargs) -> None:
        (tqdm.write if self.bar is not None else print)(" ".join(map(str, args)), **kwargs)

    # -- the epoch's bar: opened wherever lightning enters the epoch, closed when what follows begins

    def open(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if self.epoch == epoch or not self.enabled:
            return
        self.close(pl_module)  # the previous epoch's line, now that its validation metrics are known
        self.epoch, self.total = epoch, len(trainer.datamodule.x_train)
        # the module has placed itself in this epoch by now (a resumed one part-way, or at its end)
        start = pl_module.epoch_offset if pl_module.offset_epoch == epoch else 0
        self.label = f"{self.name} epoch {epoch + 1}/{trainer.max_epochs}".strip()
        self.start = self.last = self.ended = (start, time.perf_counter())
        if self.live:  # the width as the epoch starts (tqdm's own query hides the bar on a pty with 0 rows);
            # the run's name is on the line above (a log line names it: parallel jobs' lines interleave)
            self.bar = tqdm(
                total=self.total,
                initial=start,
                desc=f"epoch {epoch + 1}/{trainer.max_epochs}",
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]",
                file=sys.stdout,
                leave=True,
                smoothing=0,
                ncols=terminal_columns(),
                nrows=20,
            )

    def close(self, pl_module) -> None:
        if self.epoch is None:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(pl_module, *self.ended, end=True), refresh=False)
            self.bar.close()
            self.bar = None
        else:
            self.line(pl_module, *self.ended, since=self.start, end=True)  # the epoch's mean rate
        self.epoch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.open(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.epoch is None:
            return
        n = pl_module.epoch_offset
        self.ended = (n, time.perf_counter())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(pl_module, *self.ended), refresh=False)
            self.bar.update(n - self.bar.n)
        elif self.ended[1] - self.last[1] >= self.every_seconds:
            self.line(pl_module, *self.ended, since=self.last)
            self.last = self.ended

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # before the module's own epoch end: its last metrics are shown when the bar closes
        self.open(trainer, pl_module)  # entered at the epoch's end (a resumed run)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close(pl_module)  # a stop: the bar stays where the run stopped

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close(pl_module)

    # -- what the bar says: Keras' names (loss, acc, val_loss, val_acc) for MLflow's train/loss, ...

    def fields(self, pl_module, end: bool = False) -> list[str]:
        """The latest train metrics; at the epoch's end, validation's if it ran there (as Keras)."""
        latest, keys = pl_module.latest, [names.TRAIN_LOSS, names.TRAIN_ACC]
        if end and pl_module.last_val_step == pl_module.examples:
            keys += [names.VAL_LOSS, names.VAL_ACC]
        return [
            f"{k.removeprefix(names.TRAIN).replace('/', '_')} {metric_text(k, latest[k])}" for k in keys if k in latest
        ]

    def postfix(self, pl_module, n: int, now: float, end: bool = False) -> str:
        rate = (n - self.start[0]) / max(now - self.start[1], 1e-9)  # examples resumed at are not in it
        return ", ".join([f"{rate:.0f} ex/s", *self.fields(pl_module, end)])

    def line(self, pl_module, n: int, now: float, since: tuple[int, float], end: bool = False) -> None:
        rate = (n - since[0]) / max(now - since[1], 1e-9)
        log.info(
            "%s",
            ", ".join(
                [
                    f"{self.label}: {n}/{self.total} examples ({100 * n / self.total:.0f}%)",
                    f"{rate:.0f} examples/s",
                    f"{pl_module.updates} updates",
                    *self.fields(pl_module, end),
                ]
            ),
        )

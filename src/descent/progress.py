"""The terminal's progress: examples of the epoch, examples/s and the latest train/loss.

Lightning's bar counts what it hands the module, chunks of 8192 examples ("1/3 [00:35<01:10, 0.03it/s]").
This one counts examples. On a terminal it is Lightning's tqdm bar, redrawn in place; without one (output
to a file, a sweep's parallel jobs) it logs a plain line every `every_seconds` and at each epoch's end,
which reads well in Hydra's log file and does not interleave carriage returns between jobs.
"""

from __future__ import annotations

import logging
import sys
import time

from pytorch_lightning.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class ExamplesProgressBar(TQDMProgressBar):
    def __init__(self, name: str = "", live: bool | None = None, every_seconds: float = 30):
        super().__init__(leave=True)  # one line per epoch stays on screen, with its rate and loss
        self.name, self.every_seconds = name, every_seconds
        self.live = sys.stdout.isatty() if live is None else live  # redraw in place, or log lines

    @classmethod
    def for_job(cls, hc, name: str) -> "ExamplesProgressBar":
        """Live on a terminal, unless parallel jobs of a sweep (joblib, ray, slurm) share it."""
        return cls(name, live=sys.stdout.isatty() and hc.runtime.choices.get("hydra/launcher") in (None, "basic"))

    # -- lightning's bars: in examples; none at all when we log lines instead

    @property
    def is_disabled(self) -> bool:
        return not self.live or super().is_disabled

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit, bar.unit_scale = "ex", False  # the rate reads "ex/s"
        return bar

    # -- training: position = examples of this epoch the module has trained on

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.total = len(trainer.datamodule.x_train)
        self.epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self.train_progress_bar.total = self.total
        self.train_progress_bar.set_description(f"{self.name} {self.epoch}".strip())
        self.start = None  # set at the first chunk: a resumed epoch starts part-way

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = self.last = (pl_module.epoch_offset, time.perf_counter())
            bar = self.train_progress_bar
            bar.n = bar.initial = pl_module.epoch_offset  # not counted in the rate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = pl_module.epoch_offset
        bar = self.train_progress_bar
        if self.live:
            bar.update(n - bar.n)  # tqdm's rate: examples/s
            bar.set_postfix(self.postfix(pl_module), refresh=False)
        elif time.perf_counter() - self.last[1] >= self.every_seconds:
            self.line(pl_module, n, self.last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.live:
            self.train_progress_bar.set_postfix(self.postfix(pl_module))
        elif self.start is not None:
            self.line(pl_module, self.total, self.start)  # the epoch's mean rate
        if self._leave:
            self.train_progress_bar.close()

    def postfix(self, pl_module) -> dict:
        loss = getattr(pl_module, "last_train_loss", None)
        return {"updates": pl_module.updates, **({"train/loss": f"{loss:.4f}"} if loss is not None else {})}

    def line(self, pl_module, n: int, since: tuple[int, float]) -> None:
        now = time.perf_counter()
        rate = (n - since[0]) / max(now - since[1], 1e-9)
        fields = ", ".join(f"{k} {v}" for k, v in self.postfix(pl_module).items())
        log.info("%s%s: %d/%d examples (%.0f%%), %.0f examples/s, %s", f"{self.name} " if self.name else "",
                 self.epoch, n, self.total, 100 * n / self.total, rate, fields)
        self.last = (n, now)

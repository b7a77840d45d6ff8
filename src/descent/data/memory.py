"""Data held in memory on the training device: the base data module every dataset is (InMemoryDataModule), the
epoch's permutation, the chunks of whole updates lightning is handed (EpochChunks), the evaluation sets' (Split)."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Callable

import pytorch_lightning as pl
import torch

from descent.data.datasets import val_examples

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data on disk is missing, damaged or cannot be written."""


# ---------------------------------------------------------------------------------------------
# batches: one permutation per epoch, sliced into chunks of whole updates


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The data order of one epoch; the plain reference loop uses the same function."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def chunk_length(batch_size: int, chunk_size: int) -> int:
    """Examples per chunk: whole batches when a batch fits in a chunk, else a piece of one batch."""
    return max(1, chunk_size // batch_size) * batch_size if batch_size <= chunk_size else chunk_size


class EpochChunks:
    """An iterable of (x, y) slices of the shuffled training set; lightning treats it as a dataloader.

    Where an epoch starts is the trained position (epoch, examples of it already trained on), read
    when lightning starts iterating: a resumed run goes on with the same order from the next unseen
    example. The engine's checkpoint is the one record of it (lightning's prefetcher reads ahead).
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        chunk_size: int,
        seed: int,
        epoch_fn,
        position_fn=lambda: (0, 0),
        length: int | None = None,
    ):
        self.x, self.y, self.seed, self.epoch_fn, self.position_fn = x, y, seed, epoch_fn, position_fn
        self.step = chunk_length(batch_size, chunk_size)
        self.length = len(x) if length is None else length  # examples per epoch: fewer under drop_last

    def __len__(self) -> int:
        return -(-self.length // self.step)

    def __iter__(self):
        epoch = self.epoch_fn()
        at_epoch, consumed = self.position_fn()
        start = consumed if at_epoch == epoch else 0
        perm = epoch_permutation(len(self.x), self.seed, epoch, self.x.device)[: self.length]
        for i in range(start, len(perm), self.step):
            idx = perm[i : i + self.step]
            yield self.x[idx], self.y[idx]


class Split:
    """Fixed chunks of an evaluation set (no shuffling, no per-example work)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int):
        self.x, self.y, self.step = x, y, chunk_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.step)

    def __iter__(self):
        for i in range(0, len(self.x), self.step):
            yield self.x[i : i + self.step], self.y[i : i + self.step]


class InMemoryDataModule(pl.LightningDataModule):
    """A classification set as tensors on the training device: x float32 N x features, y int64.

    Subclasses read() their splits (CPU tensors, the shape of one example, where they came from); load()
    checks them and splits off validation once, before any MLflow run exists (train.py calls it first,
    so a bad file is refused with nothing recorded); setup() moves them to the device lightning chose.
    A subclass's __init__ takes its own parameters and `**common` (this __init__'s), which it hands on.
    """

    def __init_subclass__(cls, **kwargs):
        # a subclass's `**common` stands for this class's parameters: its signature names them one by one
        # (keyword-only), so the config checks (descent/config/schema.py) know each key of data.* and its default
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        own = list(inspect.signature(init).parameters.values())
        if not own or own[-1].kind is not inspect.Parameter.VAR_KEYWORD:
            return
        common = list(inspect.signature(InMemoryDataModule.__init__).parameters.values())[1:]
        init.__signature__ = inspect.Signature(own[:-1] + [p.replace(kind=p.KEYWORD_ONLY) for p in common])

    def __init__(
        self,
        val_size: int | float = 0,
        limit_train: int | None = None,
        batch_size: int | None = 128,
        chunk_size: int = 8192,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__()
        self.val_size, self.limit_train, self.drop_last = val_size, limit_train, drop_last
        self.batch_size, self.chunk_size, self.seed = batch_size, chunk_size, seed
        self.source: str | None = None
        # (epoch, examples of it already trained on): where the next training epoch starts. The engine that trains
        # on this data sets it (a resumed run goes on from its checkpoint's position); read at each epoch's start
        self.position: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.shape: tuple[int, ...] | None = None  # one example: (C, H, W) images or (D,) features
        self.classes: int | None = None

    # a subclass's: {"train": (x, y), "test": (x, y)[, "validation": (x, y)]}, the shape of one example, the
    # class count and a line saying where the data came from
    def read(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[int, ...], int, str]:
        raise NotImplementedError

    def split_source(self, context: str) -> str:
        """Where a split's data lives, as a URI (the run's MLflow dataset input)."""
        raise NotImplementedError

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    def net_sizes(self) -> dict:
        """What descent.nets' networks take from the data: the shape of one example and the class count."""
        self.load()
        return {"shape": tuple(self.shape), "classes": self.classes}

    def load(self) -> None:
        if self.source is not None:
            return
        splits, self.shape, self.classes, source = self.read()
        (x, y), (x_test, y_test) = splits["train"], splits["test"]
        if "validation" in splits:
            if self.val_size:
                raise DataError(
                    f"data.val_size={self.val_size!r}: the data has its own validation split "
                    f"({len(splits['validation'][0])} examples); allowed: 0"
                )
            (x_val, y_val), n_train = splits["validation"], len(x)
        else:
            n_val = val_examples(self.val_size, len(x))
            if not 0 <= n_val < len(x):
                raise DataError(
                    f"data.val_size={self.val_size!r}: the training split has {len(x)} examples; "
                    f"allowed: 0 to {len(x) - 1} (or a fraction in (0, 1))"
                )
            n_train = len(x) - n_val  # the last ones, as keras' validation_split
            x_val, y_val = x[n_train:], y[n_train:]
        # the config checks these against the table's sizes; a user's file is known only now
        if self.limit_train is not None and self.limit_train > n_train:
            raise DataError(
                f"data.limit_train={self.limit_train}: the data leave {n_train} training examples; "
                f"allowed: null (all) or 1 to {n_train}"
            )
        n_train = self.limit_train if self.limit_train is not None else n_train
        if self.batch_size is not None and self.batch_size > n_train:
            raise DataError(
                f"data.batch_size={self.batch_size}: the data leave {n_train} training examples; "
                f"allowed: null (the whole training set, batching=full) or 1 to {n_train}"
            )
        self.x_train, self.y_train = x[:n_train].contiguous(), y[:n_train]
        self.x_val, self.y_val, self.x_test, self.y_test = x_val, y_val, x_test, y_test
        self.source = source
        log.info("data: %s", source)

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str | None = None) -> None:
        self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))

    @property
    def updates_batch_size(self) -> int:
        """Examples per update; None in the config means the whole training set (batch GD)."""
        return self.batch_size or len(self.x_train)

    @property
    def epoch_length(self) -> int:
        """Examples trained on per epoch: all of them, or under drop_last the whole batches only (the epoch's
        permutation cut after its last whole batch: no partial update; the examples left out differ by epoch)."""
        n = len(self.x_train)
        return n - n % self.updates_batch_size if self.drop_last else n

    def whole_set_chunks(self) -> None:
        """One chunk per epoch: the whole training set handed to lightning at once (the graph path gathers its
        batches by index itself, so chunks only pace lightning's machinery, ~1.5 ms each)."""
        self.chunk_size = max(self.chunk_size, len(self.x_train))

    def train_dataloader(self):
        trainer = self.trainer
        return EpochChunks(
            self.x_train,
            self.y_train,
            self.updates_batch_size,
            self.chunk_size,
            self.seed,
            epoch_fn=lambda: trainer.current_epoch,
            position_fn=lambda: self.position(),  # looked up when an epoch starts: the engine sets it at fit start
            length=self.epoch_length,
        )

    def test_dataloader(self):
        return Split(self.x_test, self.y_test, self.chunk_size)

"""The toy losses' gradient oracle (data=toy): draws of gradient noise as the training set, one noiseless draw as
the validation and test sets (descent/nets/toy.py has the losses and the point they move)."""

from __future__ import annotations

from pathlib import Path

import torch

from descent.data.memory import InMemoryDataModule
from descent.nets.toy import LOSSES


class ToyData(InMemoryDataModule):
    """`n_train` draws of gradient noise (normal, std `noise` per coordinate, centred), as the training set.

    Their dimension is the toy loss's (`loss`: conf/data/toy.yaml takes the model's). The chunking is the image
    datasets'.
    """

    def __init__(
        self,
        noise: float = 0.0,
        n_train: int = 1000,
        batch_size: int | None = 1,
        chunk_size: int = 8192,
        seed: int = 0,
        loss: str = "double_well",
    ):
        super().__init__(batch_size=batch_size, chunk_size=chunk_size, seed=seed)
        if loss not in LOSSES:
            raise ValueError(f"data.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        self.noise, self.n_train, self.dim = noise, n_train, LOSSES[loss].dim
        self.source_uri = Path(__file__).as_uri()  # where the data comes from: this code (the run's dataset record)

    def load(self) -> None:
        pass  # drawn at setup, on the training device

    def split_source(self, context: str) -> str:
        return self.source_uri

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "x_train"):
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(self.seed)
        xi = self.noise * torch.randn(self.n_train, self.dim, generator=g)
        self.x_train = (xi - xi.mean(0)).to(device)  # centred: a full batch's gradient is exactly ∇f
        self.y_train = torch.zeros(self.n_train, dtype=torch.long, device=device)  # unused by the toy's loss
        self.x_val = self.x_test = torch.zeros(1, self.dim, device=device)  # noiseless: val/loss = test/loss = f(w)
        self.y_val = self.y_test = torch.zeros(1, dtype=torch.long, device=device)

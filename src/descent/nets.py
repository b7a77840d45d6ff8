"""The networks: the book's Dense(512, relu) -> Dense(10) and nothing else."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """Dense(512, relu) -> Dense(10); softmax + categorical crossentropy live in F.cross_entropy."""

    def __init__(self, in_features: int = 784, hidden: int = 512, classes: int = 10, init: str = "keras"):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        if init == "keras":  # Dense's defaults: glorot-uniform kernel, zero bias
            for layer in (self[0], self[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        elif init != "torch":
            raise ValueError(f"model.init={init!r}: allowed values are 'keras' and 'torch'")

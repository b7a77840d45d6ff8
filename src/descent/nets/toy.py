"""Toy losses for the chapter's pictures: one parameter on a curve, or a point on a 2-D surface.

They run as a `model` (the point: its start is config) and a `data` (a gradient oracle) through the same
loop, optimizers and record as the MNIST networks. Each "example" is one draw of gradient noise ξ, and its
loss is f(w) + ξ·w, so its gradient is ∇f(w) + ξ: a noisy oracle whose mean is the true gradient (the draws
are centred, so a full batch gives ∇f exactly). `batching=online` is one draw per update, and step = examples
seen counts gradient evaluations, as it does for MNIST. The validation and test "sets" are one noiseless draw:
val/loss and test/loss are f(w) itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

TILT = 0.25  # the double well's tilt: its right-hand minimum is the global one


def double_well(p):
    w = p[..., 0]
    return w**4 / 4 - w**2 / 2 - TILT * w


def rosenbrock(p):
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@dataclass(frozen=True)
class Loss:
    fn: object
    coords: tuple[str, ...]  # the metric names of the point's coordinates: toy/w, or toy/x and toy/y
    minima: dict[str, tuple[float, ...]]  # name -> point (tests/test_toy.py checks each is a zero of ∇f)
    L: float  # the Hessian's largest eigenvalue at the global minimum: gradient descent settles there only
    # with lr < 2/L, the bound of a quadratic (tests/test_toy.py checks it against torch's Hessian)
    box: tuple[tuple[float, float], ...]  # where the pictures look, per coordinate

    @property
    def dim(self) -> int:
        return len(self.coords)


# the roots of f'(w) = w^3 - w - 1/4 (numpy.roots) and f''(w) = 3w^2 - 1 at the global one; Rosenbrock's
# Hessian at (1, 1) is [[802, -400], [-400, 200]], whose largest eigenvalue is 501 + sqrt(301^2 + 400^2)
LOSSES = {
    "double_well": Loss(
        double_well,
        ("w",),
        {"global": (1.1071598716887687,), "local": (-0.8375654352833226,)},
        L=2.6774089444336724,
        box=((-2.3, 2.0),),
    ),
    "rosenbrock": Loss(
        rosenbrock, ("x", "y"), {"global": (1.0, 1.0)}, L=501 + math.hypot(301, 400), box=((-2.0, 2.0), (-1.0, 3.0))
    ),
}


class Toy(nn.Module):
    """The point w, from `start`; forward(ξ) gives each example's loss f(w) + ξ·w (see the module's doc)."""

    classifies = False  # no classes: no accuracy, no MLflow model (descent/engine/loop.py)

    def __init__(self, loss: str = "double_well", start: list[float] = (-2.0,)):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        self.loss, self.surface = loss, LOSSES[loss]
        if len(start) != self.surface.dim:
            raise ValueError(f"model.start={list(start)}: {loss} takes {self.surface.dim} coordinate(s)")
        self.start = [float(s) for s in start]
        self.w = nn.Parameter(torch.tensor(self.start))
        self.dim = self.surface.dim

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.surface.fn(self.w) + noise @ self.w

    @staticmethod
    def criterion(losses: torch.Tensor, y=None, reduction: str = "mean") -> torch.Tensor:
        """The loop's loss (F.cross_entropy's signature): the examples' losses, averaged or summed."""
        return losses.sum() if reduction == "sum" else losses.mean()

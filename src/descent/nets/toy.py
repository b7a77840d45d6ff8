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

import numpy as np
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
    "double_well": Loss(double_well, ("w",), {"global": (1.1071598716887687,), "local": (-0.8375654352833226,)},
                        L=2.6774089444336724, box=((-2.3, 2.0),)),
    "rosenbrock": Loss(rosenbrock, ("x", "y"), {"global": (1.0, 1.0)}, L=501 + math.hypot(301, 400),
                       box=((-2.0, 2.0), (-1.0, 3.0))),
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


class Trace:
    """A measurement (descent/measure/): the point's coordinates (toy/w, or toy/x and toy/y) and toy/step, the
    length of the step since the previous validation point (the last update's when validation runs at every
    update, as in the presets)."""

    def __init__(self, net: Toy):
        self.coords, self.last = net.surface.coords, torch.tensor(net.start, dtype=torch.float64)

    # a resumed run's first step is measured from where the checkpoint left the point (the loop's checkpoint
    # carries each measurement's state_dict)
    def state_dict(self) -> dict:
        return {"last": self.last.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.last = torch.tensor(state["last"], dtype=torch.float64)

    def __call__(self, module) -> dict[str, float]:
        w = module.net.w.detach().double().cpu()
        found = {f"toy/{c}": float(v) for c, v in zip(self.coords, w)}
        found["toy/step"] = float((w - self.last).norm())
        self.last = w
        return found


# -- pictures: a run's trajectory (train.py logs it), and the presets' figures (descent/reports/pictures.py) --------

def which_minimum(loss: str, point) -> str:
    """The minimum the gradient flow from `point` ends in (small plain steps, float64): 'global', 'local', or
    'diverged' for a non-finite point."""
    surface = LOSSES[loss]
    p = torch.tensor(np.asarray(point, dtype=np.float64).reshape(-1))
    if not torch.isfinite(p).all():
        return "diverged"
    lr = 0.2 / surface.L
    for _ in range(20000):
        p = p.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(surface.fn(p), p)
        p = p - lr * g
        if g.norm() < 1e-10:
            break
    return min(surface.minima, key=lambda m: float((p.detach() - torch.tensor(surface.minima[m])).norm()))


def draw(ax, loss: str, paths: list[tuple[np.ndarray, str, str]], end_marker: str = "*") -> None:
    """The loss curve (1-D) or the surface's contours (2-D, log-spaced levels) with paths drawn on it.

    paths: (points n x dim, colour, label); the start is a circle, the end `end_marker`.
    """
    surface = LOSSES[loss]
    if surface.dim == 1:
        w = np.linspace(*surface.box[0], 400)
        curve = surface.fn(torch.tensor(w)[:, None]).numpy()
        ax.plot(w, curve, color="0.3", lw=1.5)
        margin = 0.08 * (curve.max() - curve.min())
        ax.set_ylim(curve.min() - margin, curve.max() + margin)  # a diverging path leaves the picture
        for points, color, label in paths:
            w = points[:, 0]
            f = surface.fn(torch.tensor(points)).numpy()
            ax.plot(w, f, "-", color=color, lw=0.8, alpha=0.7, label=label)
            ax.plot(w, f, ".", color=color, ms=3, alpha=0.5)
            ax.plot(w[:1], f[:1], "o", color=color, ms=6)
            ax.plot(w[-1:], f[-1:], end_marker, color=color, ms=11, mec="k", mew=0.5)
        ax.set_xlabel("w")
        ax.set_ylabel("loss f(w)")
        ax.set_xlim(*surface.box[0])
    else:
        (x0, x1), (y0, y1) = surface.box
        x, y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        f = surface.fn(torch.tensor(np.stack([x, y], -1))).numpy()
        ax.contour(x, y, f, levels=np.geomspace(max(f.min(), 1e-3), f.max(), 18), colors="0.6", linewidths=0.7)
        for points, color, label in paths:
            ax.plot(points[:, 0], points[:, 1], "-", color=color, lw=1, alpha=0.8, label=label)
            ax.plot(points[:1, 0], points[:1, 1], "o", color=color, ms=6)
            ax.plot(points[-1:, 0], points[-1:, 1], end_marker, color=color, ms=11, mec="k", mew=0.5)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(surface.coords[0])
        ax.set_ylabel(surface.coords[1])
    for name, point in surface.minima.items():
        at = (point[0], float(surface.fn(torch.tensor(point)))) if surface.dim == 1 else point
        ax.plot(*at, "+", color="k", ms=12, mew=1.5)
        ax.annotate(f"{name} minimum", at, textcoords="offset points", xytext=(0, -16), ha="center", fontsize=8)


def path_of(client, run_id: str, net_or_start, loss: str) -> np.ndarray:
    """A run's trajectory from its record: the start, then the logged point at each validation point."""
    coords = LOSSES[loss].coords
    columns = []
    for c in coords:
        history = sorted(client.get_metric_history(run_id, f"toy/{c}"), key=lambda m: m.step)
        columns.append([m.value for m in history])
    n = min(map(len, columns))
    start = np.asarray(net_or_start, dtype=float).reshape(1, -1)
    return np.concatenate([start, np.array([col[:n] for col in columns], dtype=float).T.reshape(n, len(coords))])


def log_trajectory(logger, net: Toy) -> None:
    """The run's artifact trajectory.png: its path on the curve or surface, from the record."""
    from matplotlib.figure import Figure

    logger.wait_for_store()  # every point written first: the picture is drawn from the record
    points = path_of(logger.experiment, logger.run_id, net.start, net.loss)
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    draw(ax, net.loss, [(points, "C0", None)])
    ax.set_title(f"{logger._run_name}: {len(points) - 1} points from {net.start} to "
                 f"{', '.join(f'{v:.4g}' for v in points[-1])}", fontsize=9)
    logger.experiment.log_figure(logger.run_id, fig, "trajectory.png")

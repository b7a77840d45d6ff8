"""Sharpness: the largest eigenvalue λ_max of the training loss's Hessian, on a fixed subset of the training set.

Cohen et al. 2021 (arXiv:2103.00065): with full-batch gradient descent at step size η, λ_max rises
("progressive sharpening") until it reaches 2/η, the largest curvature at which gradient descent on a
quadratic does not diverge, and then hovers there ("the edge of stability"); with heavy-ball momentum β the
threshold is (2 + 2β)/η. λ_max comes from Lanczos (scipy's eigsh, ARPACK) on Hessian-vector products
by double backward: the Hessian (P x P, P ~ 400k for the MLP) is never formed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from descent.tracking import names


def hessian_vector_product(net, criterion, x, y, chunk: int = 2048):
    """v -> H v for the mean loss over (x, y), H the Hessian in the net's parameters (flat float64 numpy).

    The gradient's graph (forward and first backward, create_graph) is built once per chunk and kept: each
    product is then one more backward through it. torch.autograd.grad never touches .grad: the training's
    accumulated gradients stay as they are.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    n = len(x)
    grads = [
        torch.autograd.grad(
            criterion(net(x[i : i + chunk]), y[i : i + chunk], reduction="sum") / n, params, create_graph=True
        )
        for i in range(0, n, chunk)
    ]

    def hvp(v: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(np.ravel(v), dtype=params[0].dtype, device=params[0].device)
        vs = [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params]), params)]
        out = torch.zeros_like(flat)
        for g in grads:
            dot = sum((gi * u).sum() for gi, u in zip(g, vs))
            out += torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params, retain_graph=True)])
        return out.double().cpu().numpy()

    return hvp, sum(p.numel() for p in params)


def lambda_max(net, criterion, x, y, tol: float = 1e-4, v0: np.ndarray | None = None, chunk: int = 2048, ncv: int = 8):
    """(λ_max, its eigenvector): the algebraically largest eigenvalue of the mean loss's Hessian over (x, y).

    v0 starts Lanczos (a previous eigenvector converges in fewer products); without it a fixed random
    vector (numpy's generator seeded 0), so the measurement never draws from torch's random state. ncv:
    Lanczos vectors kept by ARPACK; 8 took 9-13 products on the MLP here (warm or cold), its default 20 took 21.
    """
    # scipy.sparse.linalg costs 0.13 s to import (-X importtime), at every training start if at the top: the
    # measurement is off by default
    from scipy.sparse.linalg import LinearOperator, eigsh

    hvp, size = hessian_vector_product(net, criterion, x, y, chunk)
    if size == 1:  # ARPACK needs a matrix of at least 2 x 2; a 1 x 1 Hessian is its own eigenvalue
        return float(hvp(np.ones(1))[0]), np.ones(1)
    if v0 is None:
        v0 = np.random.default_rng(0).standard_normal(size)
    op = LinearOperator((size, size), matvec=hvp, dtype=np.float64)
    values, vectors = eigsh(op, k=1, which="LA", tol=tol, v0=v0, ncv=min(size, ncv))
    return float(values[0]), vectors[:, 0]


def threshold(group: dict) -> float | None:
    """The largest curvature at which this optimizer's update is stable on a quadratic (Cohen et al. 2021, app.):
    2/η for gradient descent, (2 + 2β)/η with heavy-ball momentum β, (2 + 2β)/(η(1 + 2β)) with Nesterov's;
    torch's dampening d scales the gradient by (1 - d). None for the adaptive methods (RMSprop, Adam), whose
    step is preconditioned: their threshold is on the preconditioned Hessian, not on λ_max."""
    if "momentum" not in group or "nesterov" not in group:  # torch.optim.SGD's param group has both
        return None
    lr, beta, damp = float(group["lr"]), float(group["momentum"]), float(group.get("dampening", 0) or 0)
    if beta == 0:
        return 2 / lr
    lr_eff = lr * (1 - damp)
    return (2 + 2 * beta) / (lr_eff * (1 + 2 * beta)) if group["nesterov"] else (2 + 2 * beta) / lr_eff


class Sharpness:
    """trainer.sharpness_every: λ_max of the loss on the first `subset` training examples (a fixed subset: the
    data is held in one order), at the first validation point at least `every` updates after the last one,
    logged as sharpness/lambda_max beside sharpness/threshold (2/η, ...) at step = examples seen."""

    def __init__(self, every: int, subset: int = 5000, tol: float = 1e-3):
        self.every, self.subset, self.tol = every, subset, tol
        self.due = 0  # the next measurement at or after this many updates
        self.vector: np.ndarray | None = None  # the last eigenvector: the next Lanczos starts from it

    def state_dict(self) -> dict:  # a resumed run goes on with the same schedule and Lanczos start
        return {"due": self.due, "vector": None if self.vector is None else torch.from_numpy(self.vector)}

    def load_state_dict(self, state: dict) -> None:
        self.due = state["due"]
        self.vector = None if state["vector"] is None else state["vector"].numpy()

    def __call__(self, point) -> dict[str, float]:
        if point.updates < self.due:
            return {}
        self.due = (point.updates // self.every + 1) * self.every
        x, y = point.x_train[: self.subset], point.y_train[: self.subset]
        value, self.vector = lambda_max(point.net, point.criterion, x, y, self.tol, self.vector)
        found = {names.SHARPNESS: value}
        limit = threshold(point.optimizer.param_groups[0])
        if limit is not None and math.isfinite(limit):
            found[names.SHARPNESS_THRESHOLD] = limit
        return found

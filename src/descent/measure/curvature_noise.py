"""Two noise scales that weigh the gradient noise by a metric M, beside B_simple (descent/measure/noise.py):

    B_M = tr(M Σ) / (Gᵀ M G),   G the true gradient, Σ the per-example gradient covariance.

- B_noise (McCandlish et al. 2018, arXiv:1812.06162, eq. 2.8): M = H, the loss's Hessian. Their prediction of
  the critical batch size for SGD with the best step size; B_simple = tr Σ/|G|² is its H ∝ I simplification.
- B_precond: M = P, the diagonal preconditioner of the run's own optimizer, 1/(√v̂ + ε) for Adam and AdamW
  (v̂ = exp_avg_sq / (1 − β₂^t), or max_exp_avg_sq with amsgrad), 1/(√square_avg + ε) for RMSprop (square_avg
  minus grad_avg² when centered), times the group's lr (one lr: a scale, which cancels in the ratio). The noise
  scale of the step the optimizer actually takes, P g.

The two-batch estimator (McCandlish et al., appendix A.1), applied to gᵀMg: a batch mean g_b of b independent
examples has E[g_bᵀ M g_b] = Gᵀ M G + tr(M Σ)/b. Measured at two batch sizes, small and big, it gives both:
    Gᵀ M G = (B_big S_big − B_small S_small)/(B_big − B_small),  tr(M Σ) = (S_small − S_big)/(1/B_small − 1/B_big).

For B_noise the small batches are k groups of m examples (g_1 ... g_k, one backward each) and the big one their
union (n = k m): with Q_ij = g_iᵀ H g_j (k Hessian-vector products, H g_j by double backward through the
run's own loss, point.criterion, as descent/measure/sharpness.py does) the estimates are the mean of Q's
off-diagonal (Gᵀ H G) and m times its diagonal's excess over it (tr H Σ). The Hessian is taken on a subset of
training examples disjoint from the groups: an H estimated from the groups' own examples would correlate with
them and bias the diagonal. For B_precond P is a diagonal matrix, so B_small = 1 costs nothing more on a net of
linear layers: example i's gradient of a layer z = W a + b is (δ_i a_iᵀ, δ_i) and
    g_iᵀ P g_i = Σ_rc P_W,rc δ_ir² a_ic² + Σ_r P_b,r δ_ir²,
one matrix product per layer on the squares (noise.py's identity, weighted); other nets take the groups' path.

Errors: delete-one-group (or block) jackknife standard errors over the probe: the probe's own sampling error,
not the Hessian subset's (H is one fixed estimate).
"""

from __future__ import annotations

import torch
from torch import nn

from descent.measure.sharpness import hessian_vector_product
from descent.measure.noise import AtTargets, _deltas, b_simple_with_error, jackknife, linear_layers

# the metric names, logged at each target's first crossing as <name>/<acc> (and at that step as <name>)
from descent.tracking.names import (
    B_NOISE,
    B_NOISE_SE,
    B_PRECOND,
    B_PRECOND_SE,
    GRAD_H_GRAD,
    GRAD_P_GRAD,
    TRACE_H_COV,
    TRACE_P_COV,
)

PRECONDITIONED = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.RMSprop")  # the optimizers P is read from


# -- the estimator -------------------------------------------------------------------------------------------


def _two_batch(q: torch.Tensor, m: int) -> tuple[float, float, float]:
    """(Gᵀ M G, tr M Σ, their ratio) from Q_ij = g_iᵀ M g_j of k group means of m examples each."""
    k = len(q)
    diag = float(q.diagonal().sum())
    off = (float(q.sum()) - diag) / (k * (k - 1))
    trace = m * (diag / k - off)
    return off, trace, trace / off if off > 0 else float("nan")


def two_batch_with_error(q: torch.Tensor, m: int) -> dict[str, float]:
    """The two-batch estimate from the k x k matrix Q_ij = g_iᵀ M g_j of k group means of m examples each
    (B_small = m, B_big = k m), with its delete-one-group jackknife standard error and bias."""
    q = q.double()
    k = len(q)
    if k < 3:
        raise ValueError(f"the two-batch estimator's jackknife needs at least 3 groups, got {k}")
    quad, trace, full = _two_batch(q, m)
    # group i left out: its row and column leave the sum, its diagonal term the trace (O(k²) in all)
    d, rows, total, trace_q = q.diagonal(), q.sum(1), q.sum(), q.diagonal().sum()
    off = (total - 2 * rows + d - (trace_q - d)) / ((k - 1) * (k - 2))
    sub_trace = m * ((trace_q - d) / (k - 1) - off)
    leave = torch.where(off > 0, sub_trace / off, torch.full_like(off, float("nan")))
    se, bias = jackknife(leave, full)
    return {"quad": quad, "trace": trace, "ratio": full, "se": se, "bias": bias, "groups": k, "group_size": m}


def group_gradients(
    net: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, groups: int
) -> tuple[torch.Tensor, int]:
    """(k x P float64: the mean gradient of each of `groups` contiguous groups of equal size m, over the
    parameters in net.parameters() order; m). The last n mod k examples are left out. Nothing touches .grad."""
    params = [p for p in net.parameters() if p.requires_grad]
    m = len(x) // groups
    if m < 1:
        raise ValueError(f"{len(x)} examples cannot make {groups} groups")
    rows = []
    with torch.enable_grad():
        for j in range(groups):
            xs, ys = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
            g = torch.autograd.grad(criterion(net(xs), ys, reduction="sum") / m, params)
            rows.append(torch.cat([t.reshape(-1) for t in g]).double())
    return torch.stack(rows), m


def hessian_quadratic(
    net: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """Q = V H Vᵀ (k x k, float64), H the Hessian of the mean loss over (x, y): one Hessian-vector product per
    row of V (double backward, descent/measure/sharpness.py), symmetrised."""
    with torch.enable_grad():
        hvp, size = hessian_vector_product(net, criterion, x, y, chunk)
        hv = torch.stack([torch.from_numpy(hvp(v.cpu().numpy())) for v in vectors]).to(vectors)
    q = vectors @ hv.T
    return (q + q.T) / 2


def b_noise_with_error(
    net: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, hessian_examples: int, groups: int = 32
) -> dict[str, float]:
    """B_noise = tr(HΣ)/(GᵀHG) on (x, y): H on the first `hessian_examples` (at most half of them), the
    gradients in `groups` groups of the rest; with its jackknife error over the groups."""
    nh = min(hessian_examples, len(x) // 2)
    grads, m = group_gradients(net, criterion, x[nh:], y[nh:], min(groups, len(x) - nh))  # a tiny set: fewer
    found = two_batch_with_error(hessian_quadratic(net, criterion, x[:nh], y[:nh], grads), m)
    return found | {"hessian_examples": nh}


# -- the preconditioner --------------------------------------------------------------------------------------


def diagonal_preconditioner(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """{id(parameter): P} with P = lr / (√v̂ + ε), the diagonal the optimizer's next step multiplies its
    (momentum-averaged) gradient by: Adam and AdamW (bias-corrected exp_avg_sq, or max_exp_avg_sq with amsgrad),
    RMSprop (square_avg, centered: minus grad_avg²). Raises ValueError for any other state, or before the
    first step (no second moment yet)."""
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state:  # Adam, AdamW
                v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                step = float(state["step"])
                v = v / (1 - group["betas"][1] ** step)
            elif "square_avg" in state:  # RMSprop: no bias correction
                v = state["square_avg"]
                if group.get("centered"):
                    v = v - state["grad_avg"].square()
            else:
                what = ", ".join(sorted(state)) or "no state yet (before the first step)"
                raise ValueError(
                    f"{type(optimizer).__name__}: no diagonal second-moment preconditioner "
                    f"(exp_avg_sq or square_avg) for a parameter of shape {list(p.shape)}: {what}"
                )
            found[id(p)] = (float(group["lr"]) / (v.sqrt() + group["eps"])).detach()
    return found


def _precond_blocks(net: nn.Module, x, y, criterion, precond: dict[int, torch.Tensor]):
    """(g_iᵀ P g_i per example, √P ⊙ Σ_i g_i flattened), float64: the linear-layer identity weighted by P."""
    layers, inputs, deltas = _deltas(net, x, y, criterion)
    sq = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    parts = []
    with torch.no_grad():
        for a, d, layer in zip(inputs, deltas, layers):
            pw = precond[id(layer.weight)].to(a.dtype)
            d2 = d.square()
            sq += (d2 * (a.square() @ pw.T)).sum(1).double()
            parts.append((pw.sqrt() * (d.T @ a)).double().flatten())
            if layer.bias is not None:
                pb = precond[id(layer.bias)].to(d.dtype)
                sq += (d2 @ pb).double()
                parts.append((pb.sqrt() * d.sum(0)).double())
    return sq, torch.cat(parts)


def b_precond_with_error(
    net: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, precond: dict[int, torch.Tensor], blocks: int = 32
) -> dict[str, float]:
    """B_precond = tr(PΣ)/(GᵀPG) over all of (x, y) for the diagonal P ({id(parameter): tensor}), with its
    jackknife error. A net of linear layers only: per-example terms (B_small = 1) in `blocks` blocks, noise.py's
    estimator in the metric P; any other net: the two-batch estimator over `blocks` groups."""
    try:
        linear_layers(net)
    except ValueError:
        grads, m = group_gradients(net, criterion, x, y, min(blocks, len(x)))
        p = torch.cat([precond[id(t)].reshape(-1) for t in net.parameters() if t.requires_grad]).to(grads)
        found = two_batch_with_error((grads * p) @ grads.T, m)
        return {
            "grad_p_grad": found["quad"],
            "trace_p_cov": found["trace"],
            "b_precond": found["ratio"],
            "b_precond_se": found["se"],
        }
    edges = torch.linspace(0, len(x), blocks + 1).round().long().tolist()
    found = b_simple_with_error(
        [_precond_blocks(net, x[a:b], y[a:b], criterion, precond) for a, b in zip(edges, edges[1:]) if b > a]
    )
    return {
        "grad_p_grad": found["grad_sq"],
        "trace_p_cov": found["trace_cov"],
        "b_precond": found["b_simple"],
        "b_precond_se": found["b_simple_se"],
    }


# -- the measurements at the target crossings ----------------------------------------------------------------


class HessianNoiseAtTargets(AtTargets):
    """trainer.noise_hessian_at_targets: B_noise with its jackknife error at each target's first crossing.
    H on the first `subset` training examples (at most half), the gradients in `groups` groups of the rest.
    Costs a pass of forward and backward over the training set and `groups` Hessian-vector products on the
    subset per crossing (outside progress/seconds, as every measure)."""

    def __init__(self, targets, groups: int = 32, subset: int = 4096):
        super().__init__(targets)
        self.groups, self.subset = groups, subset

    def measure(self, point) -> dict[str, float]:
        f = b_noise_with_error(point.net, point.criterion, point.x_train, point.y_train, self.subset, self.groups)
        return {B_NOISE: f["ratio"], B_NOISE_SE: f["se"], GRAD_H_GRAD: f["quad"], TRACE_H_COV: f["trace"]}


class PreconditionedNoiseAtTargets(AtTargets):
    """trainer.noise_preconditioned_at_targets: B_precond with its jackknife error over the whole training set
    at each target's first crossing, P read from the optimizer's state at that point. Costs about one pass of
    forward and backward over the training set per crossing (as NoiseAtTargets)."""

    def __init__(self, targets, blocks: int = 32):
        super().__init__(targets)
        self.blocks = blocks

    def measure(self, point) -> dict[str, float]:
        f = b_precond_with_error(
            point.net,
            point.criterion,
            point.x_train,
            point.y_train,
            diagonal_preconditioner(point.optimizer),
            self.blocks,
        )
        return {
            B_PRECOND: f["b_precond"],
            B_PRECOND_SE: f["b_precond_se"],
            GRAD_P_GRAD: f["grad_p_grad"],
            TRACE_P_COV: f["trace_p_cov"],
        }

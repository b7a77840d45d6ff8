"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, arXiv:1812.06162, appendix A.1).

At each validation point, on a fixed probe of training examples: every example's gradient norm (B_small = 1)
and the norm of the probe's mean gradient (B_big = probe size) give unbiased estimates of |G|² (the true
gradient's squared norm) and tr(Σ) (the per-example gradient covariance's trace). Their ratio is the batch
size at which a gradient step's noise equals its signal; larger batches stop paying near it.

Per-example norms without a per-example backward: for a linear layer z = W a + b and loss L_i of example i,
the gradient of L_i with respect to (W, b) is (δ_i a_iᵀ, δ_i) with δ_i = ∂L_i/∂z_i, so
‖g_i‖² = ‖δ_i‖² (‖a_i‖² + 1). One backward of the summed loss to the layers' outputs gives every δ_i.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from descent.tracking import names


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    """The net's linear layers; refused unless they hold every parameter (the identity covers nothing else)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
    others = [name for name, p in net.named_parameters() if id(p) not in covered]
    if others:
        raise ValueError(
            f"trainer.noise_scale: per-example gradient norms cover nn.Linear layers only; "
            f"{', '.join(others)} lie outside one"
        )
    return layers


def _deltas(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn):
    """(layers, their inputs, ∂L/∂outputs) of the summed loss: δ_i is example i's own gradient at a layer's output."""
    layers = linear_layers(net)
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        with torch.enable_grad():
            loss = loss_fn(net(x), y, reduction="sum")
            deltas = torch.autograd.grad(loss, outputs)
    finally:
        for h in handles:
            h.remove()
    n = len(x)
    return layers, [a.detach().reshape(n, -1) for a in inputs], [d.reshape(n, -1) for d in deltas]


def per_example_grads(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖g_i‖² per example, ‖mean_i g_i‖²) of the loss (the training loss: cross-entropy), over every
    parameter of the net.

    Nothing is accumulated into .grad (autograd.grad), no module is left hooked.
    """
    sq, total = per_example_and_sum(net, x, y, loss_fn)
    return sq, (total / len(x)).square().sum()


def per_example_and_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖g_i‖² per example, Σ_i g_i flattened over every parameter), float64."""
    layers, inputs, deltas = _deltas(net, x, y, loss_fn)
    n = len(x)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    parts = []
    with torch.no_grad():
        for a, d, layer in zip(inputs, deltas, layers):
            bias = 1.0 if layer.bias is not None else 0.0
            sq += (d.square().sum(1) * (a.square().sum(1) + bias)).double()
            parts.append((d.T @ a).double().flatten())  # Σ δ_i a_iᵀ and Σ δ_i
            if layer.bias is not None:
                parts.append(d.sum(0).double())
    return sq, torch.cat(parts)


def estimates(sq: torch.Tensor, mean_sq: torch.Tensor) -> tuple[float, float]:
    """(|G|², tr Σ) from per-example squared norms (B_small = 1) and the mean's (B_big = n): appendix A.1."""
    return _unbiased(len(sq), float(sq.mean()), float(mean_sq))


def _unbiased(n: int, small: float, big: float) -> tuple[float, float]:
    return (n * big - small) / (n - 1), (small - big) / (1 - 1 / n)


def jackknife(leave: torch.Tensor, full: float) -> tuple[float, float]:
    """The delete-one-group jackknife's standard error and bias of the estimate `full`, from its values with each of
    k groups left out in turn (the error nan for k = 1)."""
    k = len(leave)
    se = float(((k - 1) / k * (leave - leave.mean()).square().sum()).sqrt()) if k > 1 else float("nan")
    return se, float((k - 1) * (leave.mean() - full))


def b_simple_with_error(blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """B_simple = tr Σ / |G|² over every example of `blocks` [(‖g_i‖² of the block, Σ g_i of the block)], with
    its delete-one-block jackknife standard error (Quenouille-Tukey: the probe's own sampling error; the ratio's
    bias is O(1/n) and the jackknife's estimate of it is reported as noise/b_simple_bias)."""
    k = len(blocks)
    counts = torch.tensor([len(sq) for sq, _ in blocks], dtype=torch.float64)
    q = torch.stack([sq.sum() for sq, _ in blocks])  # Σ ‖g_i‖² per block
    sums = torch.stack([s for _, s in blocks])  # Σ g_i per block (k x P)
    total, n = sums.sum(0), float(counts.sum())
    gram = sums @ total  # S_k · S
    norms = sums.square().sum(1)  # ‖S_k‖²

    def ratio(m, q_sum, s_sq):
        grad_sq, trace_cov = _unbiased(m, q_sum / m, s_sq / m**2)
        return grad_sq, trace_cov, trace_cov / grad_sq if grad_sq > 0 else float("nan")

    s_sq = float(total.square().sum())
    grad_sq, trace_cov, full = ratio(n, float(q.sum()), s_sq)
    leave = torch.tensor(
        [
            ratio(n - float(counts[i]), float(q.sum() - q[i]), s_sq - 2 * float(gram[i]) + float(norms[i]))[2]
            for i in range(k)
        ]
    )
    se, bias = jackknife(leave, full)
    return {
        "grad_sq": grad_sq,
        "trace_cov": trace_cov,
        "b_simple": full,
        "b_simple_se": se,
        "b_simple_bias": bias,
        "probe": n,
    }


def measure_with_error(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: int = 32, loss_fn=F.cross_entropy
) -> dict[str, float]:
    """b_simple_with_error over all of (x, y), in `blocks` contiguous blocks (one forward and backward each)."""
    edges = torch.linspace(0, len(x), blocks + 1).round().long().tolist()
    return b_simple_with_error(
        [per_example_and_sum(net, x[a:b], y[a:b], loss_fn) for a, b in zip(edges, edges[1:]) if b > a]
    )


@contextmanager
def untouched(net: nn.Module, device: torch.device):
    """A measurement leaves training as it was: the net's buffers (batch norm's running statistics, if a net had
    them) restored, and the RNG (dropout) forked."""
    buffers = [b.clone() for b in net.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for b, saved in zip(net.buffers(), buffers):
            b.copy_(saved)


class NoiseScale:
    """noise/grad_sq, noise/trace_cov (this point's estimates) and noise/b_simple (the ratio of their EMAs).

    The probe is the same `probe` training examples at every point, drawn with the run's seed from a
    generator of its own (the global RNG is not touched). `ema` is the weight of the past: a point's
    estimate of |G|² is noisy (it may come out negative late in training), so numerator and denominator
    are averaged separately, as McCandlish et al. do. Both start at 0 and would need the same bias
    correction, which cancels in the ratio: the first point's b_simple is that point's own ratio.
    """

    def __init__(self, probe: int = 1024, ema: float = 0.5, seed: int = 0):
        self.probe, self.ema, self.seed = probe, ema, seed
        self.avg = {"grad_sq": 0.0, "trace_cov": 0.0}  # in the checkpoint (state_dict)

    def state_dict(self) -> dict:
        return dict(self.avg)

    def load_state_dict(self, state: dict) -> None:
        self.avg = dict(state)

    def _indices(self, n: int, device) -> torch.Tensor:
        if getattr(self, "_probe_key", None) != (n, device):
            g = torch.Generator().manual_seed(self.seed)
            self._idx = torch.randperm(n, generator=g)[: min(self.probe, n)].to(device)
            self._probe_key = (n, device)
        return self._idx

    def __call__(self, point) -> dict[str, float]:
        x, y = point.x_train, point.y_train
        idx = self._indices(len(x), x.device)
        if len(idx) < 2:
            return {}
        with untouched(point.net, x.device):
            sq, mean_sq = per_example_grads(point.net, x[idx], y[idx], point.criterion)
        grad_sq, trace_cov = estimates(sq, mean_sq)
        a, beta = self.avg, self.ema
        a["grad_sq"] = beta * a["grad_sq"] + (1 - beta) * grad_sq
        a["trace_cov"] = beta * a["trace_cov"] + (1 - beta) * trace_cov
        b_simple = a["trace_cov"] / a["grad_sq"] if a["grad_sq"] > 0 else float("nan")
        return {names.NOISE_GRAD_SQ: grad_sq, names.NOISE_TRACE_COV: trace_cov, names.NOISE_B_SIMPLE: b_simple}


class AtTargets:
    """A measurement at the first validation point where val/acc reaches each target: measure() once for all the
    targets crossed there, each of its metrics logged as <name>/<acc> and, at that step, the names in `at_step`
    (None: all of them) without the suffix. Which targets were crossed is in the checkpoint."""

    at_step: tuple[str, ...] | None = None

    def __init__(self, targets):
        self.targets = sorted({float(t) for t in targets})
        self.crossed: list[float] = []  # in the checkpoint

    def state_dict(self) -> dict:
        return {"crossed": list(self.crossed)}

    def load_state_dict(self, state: dict) -> None:
        self.crossed = list(state["crossed"])

    def measure(self, point) -> dict[str, float]:
        raise NotImplementedError

    def __call__(self, point) -> dict[str, float]:
        acc = point.latest.get(names.VAL_ACC)  # this point's: the loop logs it before it calls the measures
        due = [t for t in self.targets if acc is not None and acc >= t and t not in self.crossed]
        if not due:
            return {}
        with untouched(point.net, point.x_train.device):
            found = self.measure(point)
        out = {k: v for k, v in found.items() if self.at_step is None or k in self.at_step}
        for t in due:
            self.crossed.append(t)
            out |= {f"{k}/{t:g}": v for k, v in found.items()}
        return out


class NoiseAtTargets(AtTargets):
    """B_simple with its error at the first validation point where val/acc reaches each target (trainer.
    noise_at_targets): probe = the whole training set (|G|² from the mean gradient over every training example,
    tr Σ from every example's gradient norm), in `blocks` blocks for the jackknife; one point's own estimate,
    no average over the run. Logs noise/b_simple/<acc>, noise/b_simple_se/<acc>, noise/grad_sq/<acc>,
    noise/trace_cov/<acc> (and at that step noise/b_simple, noise/b_simple_se). Costs about one pass of
    forward and backward over the training set per target (outside progress/seconds, as every measure)."""

    at_step = (names.NOISE_B_SIMPLE, names.NOISE_B_SIMPLE_SE)

    def __init__(self, targets, blocks: int = 32):
        super().__init__(targets)
        self.blocks = blocks

    def measure(self, point) -> dict[str, float]:
        found = measure_with_error(point.net, point.x_train, point.y_train, self.blocks, point.criterion)
        return {
            names.NOISE_B_SIMPLE: found["b_simple"],
            names.NOISE_B_SIMPLE_SE: found["b_simple_se"],
            names.NOISE_GRAD_SQ: found["grad_sq"],
            names.NOISE_TRACE_COV: found["trace_cov"],
        }

"""The gradient noise scale (descent/measure/noise.py) against cases with known answers: torch.func's
per-sample gradients, a linear regression whose tr(Σ)/|G|² is known in closed form, and a training run
whose weights must not change when it is measured. In-process, small data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from conftest import measured_fit, regression_at_unit_distance
from descent.measure.noise import NoiseScale, estimates, per_example_grads
from descent.nets import MLP


def test_per_example_norms_match_torch_func_per_sample_gradients():
    torch.manual_seed(0)
    net, x, y = MLP(hidden=64), torch.randn(96, 784), torch.randint(0, 10, (96,))
    sq, mean_sq = per_example_grads(net, x, y)

    params = {k: v.detach() for k, v in net.named_parameters()}
    one = lambda p, xi, yi: F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])
    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)  # one backward per example
    sq_ref = sum(g.flatten(1).square().sum(1) for g in per_sample.values())
    mean_sq_ref = sum(g.mean(0).square().sum() for g in per_sample.values())
    torch.testing.assert_close(sq.float(), sq_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean_sq.float(), mean_sq_ref, rtol=1e-5, atol=0)
    assert all(p.grad is None for p in net.parameters())  # nothing accumulated


def test_estimators_recover_the_noise_scale_of_a_linear_regression():
    # y = w*·x + ε, x ~ N(0, I_d), ε ~ N(0, s²), squared loss, at w = w* + r: the gradient of example i is
    # 2 (r·x_i - ε_i) x_i, so |G|² = 4|r|² and tr Σ = 4((d+1)|r|² + d s²) (Gaussian fourth moments)
    d, s, n, probes = 10, 1.0, 1024, 32
    net, w_star, r, g = regression_at_unit_distance(d)
    known = ((d + 1) * 1.0 + d * s**2) / 1.0  # 21
    mse = lambda out, target, reduction: F.mse_loss(out[:, 0], target, reduction=reduction)
    totals = torch.zeros(2, dtype=torch.float64)
    for _ in range(probes):  # numerator and denominator averaged separately, as the EMA does
        x = torch.randn(n, d, generator=g)
        y = x @ w_star[0] + s * torch.randn(n, generator=g)
        totals += torch.tensor(estimates(*per_example_grads(net, x, y, loss_fn=mse)), dtype=torch.float64)
    grad_sq, trace_cov = (totals / probes).tolist()
    assert grad_sq == pytest.approx(4.0, rel=0.1)
    assert trace_cov == pytest.approx(4 * known, rel=0.1)
    assert trace_cov / grad_sq == pytest.approx(known, rel=0.1)


def _fit(mnist_root, measures):
    """Momentum SGD on 1500 examples for 2 epochs, validated (and measured) every 300 examples."""
    from functools import partial

    return measured_fit(mnist_root, MLP, partial(torch.optim.SGD, lr=0.1, momentum=0.9), measures)


def test_measuring_the_noise_scale_leaves_the_run_unchanged(mnist_root):
    plain, without = _fit(mnist_root, [])
    measured, with_it = _fit(mnist_root, [NoiseScale(probe=256)])
    assert len(without) == len(with_it) > 5
    for a, b in zip(without, with_it):
        assert torch.equal(a, b)  # bit for bit: weights, momentum buffers, the RNG
    assert "noise/b_simple" not in plain.latest
    assert measured.latest["noise/trace_cov"] > 0 and measured.latest["noise/b_simple"] > 0
    assert plain.latest["val/loss"] == measured.latest["val/loss"]


def _regression(n, d=10, s=1.0, seed=0):
    """The linear regression above, n fresh examples at w = w* + r (|r| = 1): tr Σ/|G|² = (d+1) + d s² = 21."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(1, d, generator=torch.Generator().manual_seed(123))
    r = torch.randn(1, d, generator=torch.Generator().manual_seed(456))
    net = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(w_star + r / r.norm())
    x = torch.randn(n, d, generator=g)
    y = x @ w_star[0] + s * torch.randn(n, generator=g)
    return net, x, y


MSE = staticmethod(lambda out, target, reduction: F.mse_loss(out[:, 0], target, reduction=reduction))


def test_b_simple_with_its_jackknife_error_on_a_case_with_a_known_answer():
    from descent.measure.noise import measure_with_error

    known, mse = 21.0, MSE.__func__
    # one large probe: the estimate lies within its error bars of the known value, and the bars are tight
    net, x, y = _regression(40000)
    found = measure_with_error(net, x, y, blocks=32, loss_fn=mse)
    assert abs(found["b_simple"] - known) < 3 * found["b_simple_se"] and found["b_simple_se"] < 0.05 * known
    # the error bar is the estimate's real spread: over 40 independent probes of 2000 examples, the standard
    # deviation of B_simple and the mean jackknife error agree within 30 %
    runs = [measure_with_error(*_regression(2000, seed=1 + i), blocks=32, loss_fn=mse) for i in range(40)]
    values = torch.tensor([r["b_simple"] for r in runs])
    errors = torch.tensor([r["b_simple_se"] for r in runs])
    assert float(values.std()) == pytest.approx(float(errors.mean()), rel=0.3)
    assert abs(float(values.mean()) - known) < 3 * float(values.std()) / 40**0.5 + 0.05 * known
    # a probe as small as the value to resolve gives wide bars, not a confident wrong number
    small = measure_with_error(*_regression(64, seed=99), blocks=16, loss_fn=mse)
    assert small["b_simple_se"] > 5 * found["b_simple_se"]


def test_measured_at_each_target_on_the_whole_training_set_leaves_the_run_unchanged(mnist_root):
    from descent.measure.noise import NoiseAtTargets

    plain, without = _fit(mnist_root, [])
    measured, with_it = _fit(mnist_root, [NoiseAtTargets([0.5, 0.8, 0.99], blocks=8)])
    for a, b in zip(without, with_it, strict=True):
        assert torch.equal(a, b)
    logged = measured.latest
    assert logged["noise/b_simple/0.5"] > 0 and logged["noise/b_simple_se/0.5"] > 0
    assert "noise/b_simple/0.99" not in logged  # never reached

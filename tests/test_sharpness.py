"""Sharpness (descent/measure/sharpness.py) against cases with a known answer: a quadratic, whose Hessian is
exact, and a tiny MLP, whose full Hessian torch computes; the stability threshold against gradient descent
on that quadratic."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from descent.measure.sharpness import lambda_max, threshold
from descent.nets import MLP


def half_square(out, y, reduction="mean"):
    losses = 0.5 * (out[:, 0] - y) ** 2
    return losses.sum() if reduction == "sum" else losses.mean()


def quadratic(n=200, d=30, seed=0):
    """A linear model under half the squared error: loss(w) = |Xw - y|^2 / 2n, Hessian X^T X / n exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    net = torch.nn.Linear(d, 1, bias=False).double()
    return net, x, y, torch.linalg.eigvalsh(x.T @ x / n)


def test_lambda_max_of_a_quadratic_is_the_top_eigenvalue_of_its_hessian():
    net, x, y, eigenvalues = quadratic()
    value, vector = lambda_max(net, half_square, x, y, chunk=64)  # several chunks: their products add up
    assert value == pytest.approx(float(eigenvalues[-1]), rel=1e-3)
    assert np.linalg.norm(vector) == pytest.approx(1, rel=1e-6)


def test_lambda_max_of_a_tiny_mlp_is_the_top_eigenvalue_of_torchs_full_hessian():
    torch.manual_seed(0)
    net = MLP(in_features=6, hidden=5, classes=3)  # 53 parameters
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    for p in net.parameters():  # away from the initial point, where the Hessian's top is less separated
        p.data += 0.5 * torch.randn_like(p)
    grads_before = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    value, _ = lambda_max(net, F.cross_entropy, x, y)

    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(theta):
        parts = theta.split([s.numel() for s in shapes])
        (w1, b1, w2, b2) = [t.reshape(s) for t, s in zip(parts, shapes)]
        return F.cross_entropy(torch.relu(x @ w1.T + b1) @ w2.T + b2, y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat.double().float()))
    assert value == pytest.approx(float(exact[-1]), rel=1e-3)
    assert [p.grad for p in net.parameters()] == grads_before  # the measurement leaves the gradients alone


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_threshold_is_where_gradient_descent_on_the_quadratic_starts_to_diverge(momentum):
    net, x, y, eigenvalues = quadratic(d=5)
    top = float(eigenvalues[-1])
    ends = {}
    for factor in (0.95, 1.05):  # a learning rate that puts the threshold just above, then just below, λ_max
        probe = torch.optim.SGD([torch.zeros(1)], lr=1.0, momentum=momentum)
        lr = threshold(probe.param_groups[0]) / top * factor  # the threshold is proportional to 1/lr
        net, *_ = quadratic(d=5)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        assert threshold(opt.param_groups[0]) == pytest.approx((2 + 2 * momentum) / lr)
        for _ in range(600):
            opt.zero_grad()
            half_square(net(x), y).backward()
            opt.step()
        ends[factor] = float(net.weight.detach().norm())
    assert np.isfinite(ends[0.95]) and ends[0.95] < 10  # stable below the threshold (λ_max < threshold)
    assert not np.isfinite(ends[1.05]) or ends[1.05] > 1e6  # divergent above it


def test_adaptive_optimizers_have_no_threshold_on_lambda_max():
    assert threshold(torch.optim.Adam([torch.zeros(1)]).param_groups[0]) is None
    assert threshold(
        torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.5, nesterov=True).param_groups[0]
    ) == pytest.approx(3 / (0.1 * 2))

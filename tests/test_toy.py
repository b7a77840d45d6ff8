"""The toy losses (descent/nets/toy.py): gradients, minima and curvatures against finite differences and torch's
Hessian; the double well's basins."""

import numpy as np
import pytest
import torch

from descent.nets.toy import LOSSES, Toy
from descent.reports.pictures import which_minimum


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_toy_loss_gradient_matches_central_finite_differences(name):
    surface = LOSSES[name]
    rng = np.random.default_rng(0)
    for _ in range(5):
        lo, hi = np.array(surface.box).T
        p = torch.tensor(rng.uniform(lo, hi), requires_grad=True)
        (grad,) = torch.autograd.grad(surface.fn(p), p)
        h = 1e-6
        fd = [
            (surface.fn(p.detach() + h * e) - surface.fn(p.detach() - h * e)) / (2 * h)
            for e in torch.eye(surface.dim, dtype=torch.float64)
        ]
        assert grad.numpy() == pytest.approx(np.array([float(v) for v in fd]), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_minimum_is_a_stationary_point_and_L_is_the_hessians_top_eigenvalue_there(name):
    surface = LOSSES[name]
    for point in surface.minima.values():
        p = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(surface.fn(p), p)
        assert float(grad.norm()) < 1e-8
        assert (torch.linalg.eigvalsh(torch.autograd.functional.hessian(surface.fn, p.detach())) > 0).all()
    hessian = torch.autograd.functional.hessian(surface.fn, torch.tensor(surface.minima["global"], dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(hessian)[-1]) == pytest.approx(surface.L, rel=1e-9)
    f = {m: float(surface.fn(torch.tensor(p))) for m, p in surface.minima.items()}
    assert min(f, key=f.get) == "global"


def test_the_oracle_gradient_is_the_true_gradient_plus_the_noise_draw():
    net = Toy("rosenbrock", [0.3, -0.2])
    noise = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    Toy.criterion(net(noise), None).backward()
    p = torch.tensor([0.3, -0.2], requires_grad=True)
    (true,) = torch.autograd.grad(LOSSES["rosenbrock"].fn(p), p)
    assert net.w.grad.numpy() == pytest.approx((true + noise.mean(0)).numpy(), rel=1e-6)


def test_which_minimum_follows_the_basins_not_the_nearest_minimum():
    # the barrier of the double well is at w = -0.2696, left of the midpoint between its minima (0.13)
    assert which_minimum("double_well", [-0.30]) == "local"
    assert which_minimum("double_well", [-0.24]) == "global"
    assert which_minimum("double_well", [float("nan")]) == "diverged"

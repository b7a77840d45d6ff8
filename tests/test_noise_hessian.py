"""B_noise and the preconditioned noise scale (descent/measure/curvature_noise.py) against cases with known
answers: a quadratic loss with a known Hessian and gradient covariance, a linear regression whose tr(PΣ)/(GᵀPG)
is known in closed form, the preconditioner against the step torch's optimizers actually take; a training
run whose weights must not change when it is measured; a real run of src/train.py that logs them at the
target crossings. In-process and small, but for the one run of the entry point (1000 MNIST examples)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from conftest import measured_fit, regression_at_unit_distance, train
from descent.measure import curvature_noise as cn


class Quadratic(nn.Module):
    """Per-example loss ½ (w − w*)ᵀ H (w − w*) − ξ_iᵀ w: example i's gradient is H (w − w*) − ξ_i, the Hessian
    H for every example, G = H (w − w*), Σ = Cov(ξ). The input of example i is its ξ_i."""

    def __init__(self, h, w_star, w):
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("w_star", w_star)
        self.w = nn.Parameter(w.clone())

    def forward(self, xi):
        r = self.w - self.w_star
        return 0.5 * r @ self.h @ r - xi @ self.w

    @staticmethod
    def criterion(out, target, reduction="mean"):
        return out.sum() if reduction == "sum" else out.mean()


def _quadratic(n, d=12, seed=0):
    """A rotated Hessian with eigenvalues 0.05 ... 5 and a noise covariance of its own (not aligned with it):
    B_noise and B_simple differ ~4x, so an estimator that mistook one for the other fails."""
    g = torch.Generator().manual_seed(1)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    h = rot @ torch.diag(torch.logspace(-1.3, 0.7, d, dtype=torch.float64)) @ rot.T
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    sigma = a @ a.T + 0.2 * torch.eye(d, dtype=torch.float64)
    w_star, r = torch.zeros(d, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64) * 0.02
    net = Quadratic(h, w_star, w_star + r)
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xi = noise @ torch.linalg.cholesky(sigma).T
    grad = h @ r
    known = {
        "b_noise": float(torch.trace(h @ sigma) / (grad @ h @ grad)),
        "b_simple": float(torch.trace(sigma) / (grad @ grad)),
    }
    return net, xi, torch.zeros(n), h, sigma, grad, known


def test_b_noise_recovers_the_known_tr_h_sigma_over_g_h_g_of_a_quadratic_within_10_percent():
    # 1000 groups of 198 examples (B_small near B_noise, where the estimator resolves it best), H on 2000 others
    net, x, y, h, sigma, grad, known = _quadratic(200000)
    assert known["b_noise"] == pytest.approx(57, rel=0.05) and known["b_simple"] > 3.5 * known["b_noise"]
    found = cn.b_noise_with_error(net, net.criterion, x, y, hessian_examples=2000, groups=1000)
    assert found["hessian_examples"] == 2000 and found["group_size"] == (200000 - 2000) // 1000
    assert found["ratio"] == pytest.approx(known["b_noise"], rel=0.1)
    assert found["quad"] == pytest.approx(float(grad @ h @ grad), rel=0.1)
    assert found["trace"] == pytest.approx(float(torch.trace(h @ sigma)), rel=0.1)
    # the error bar is honest: the truth within 3 of them, and they are not so wide as to say nothing
    assert abs(found["ratio"] - known["b_noise"]) < 3 * found["se"] < 0.15 * known["b_noise"]
    assert all(p.grad is None for p in net.parameters())


def test_the_jackknife_error_of_b_noise_is_the_spread_of_independent_probes():
    net, *_, known = _quadratic(10)
    runs = []
    for seed in range(30):
        _, x, y, *_ = _quadratic(20000, seed=10 + seed)
        runs.append(cn.b_noise_with_error(net, net.criterion, x, y, hessian_examples=500, groups=150))
    values = torch.tensor([r["ratio"] for r in runs])
    errors = torch.tensor([r["se"] for r in runs])
    assert float(values.std()) == pytest.approx(float(errors.mean()), rel=0.4)
    assert abs(float(values.mean()) - known["b_noise"]) < 3 * float(values.std()) / 30**0.5 + 0.05 * known["b_noise"]


def test_b_precond_recovers_tr_p_sigma_over_g_p_g_for_a_known_diagonal_p():
    # the quadratic's gradients through the groups' two-batch path (its parameter is no nn.Linear)
    net, x, y, h, sigma, grad, _ = _quadratic(200000)
    p = torch.logspace(-1, 1, len(grad), dtype=torch.float64)
    known = float((p * sigma.diagonal()).sum() / (grad @ (p * grad)))
    found = cn.b_precond_with_error(net, net.criterion, x, y, {id(net.w): p}, blocks=1000)
    assert found["b_precond"] == pytest.approx(known, rel=0.1)
    assert abs(found["b_precond"] - known) < 3 * found["b_precond_se"]
    # a linear regression through the per-example identity: y = w*·x + ε, x ~ N(0, I_d), squared loss, at
    # w = w* + r: G = 2r, Σ = 4((|r|² + s²) I + r rᵀ), so tr(PΣ)/(GᵀPG) = ((|r|² + s²) tr P + rᵀPr)/(rᵀPr)
    d, s, n = 10, 1.0, 40000
    lin, w_star, r, g = regression_at_unit_distance(d)
    xs = torch.randn(n, d, generator=g)
    ys = xs @ w_star[0] + s * torch.randn(n, generator=g)
    pw = torch.logspace(-1, 1, d).reshape(1, d)
    rpr = float((r.square() * pw).sum())
    known = ((1 + s**2) * float(pw.sum()) + rpr) / rpr
    mse = lambda out, target, reduction: F.mse_loss(out[:, 0], target, reduction=reduction)
    found = cn.b_precond_with_error(lin, mse, xs, ys, {id(lin.weight): pw}, blocks=32)
    assert found["b_precond"] == pytest.approx(known, rel=0.1)
    assert found["grad_p_grad"] == pytest.approx(4 * rpr, rel=0.1)
    # with P = I it is B_simple (noise.py's estimator on the same examples)
    from descent.measure.noise import measure_with_error

    plain = cn.b_precond_with_error(lin, mse, xs, ys, {id(lin.weight): torch.ones(1, d)}, blocks=32)
    assert plain["b_precond"] == pytest.approx(measure_with_error(lin, xs, ys, 32, mse)["b_simple"], rel=1e-9)


def test_per_example_preconditioned_norms_match_torch_func_per_sample_gradients():
    from torch.func import functional_call, grad, vmap

    from descent.nets import MLP

    torch.manual_seed(0)
    net, x, y = MLP(hidden=[32, 16], in_features=20, classes=5), torch.randn(40, 20), torch.randint(0, 5, (40,))
    precond = {id(p): torch.rand_like(p) + 0.1 for p in net.parameters()}
    sq, total = cn._precond_blocks(net, x, y, F.cross_entropy, precond)
    params = {k: v.detach() for k, v in net.named_parameters()}
    one = lambda ps, xi, yi: F.cross_entropy(functional_call(net, ps, (xi[None],)), yi[None])
    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    weights = {k: precond[id(p)] for k, p in net.named_parameters()}
    ref = sum((g.square() * weights[k]).flatten(1).sum(1) for k, g in per_sample.items())
    torch.testing.assert_close(sq.float(), ref, rtol=1e-5, atol=0)
    ref_total = sum((g.sum(0).square() * weights[k]).sum() for k, g in per_sample.items())
    torch.testing.assert_close(float(total.square().sum()), float(ref_total), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-3, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0, fused=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-3),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-3, centered=True),
    ],
    ids=["adam", "adam-amsgrad", "adamw-fused", "rmsprop", "rmsprop-centered"],
)
def test_the_preconditioner_is_the_diagonal_of_the_step_the_optimizer_takes(make):
    # the last step moved w by −P ⊙ (Adam: m̂, the bias-corrected first moment; RMSprop: g), P read after it
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = make([w])
    for _ in range(4):
        opt.zero_grad()
        (w.square() * torch.arange(50) + w.sin()).sum().backward()
        opt.step()
    opt.zero_grad()
    (w.square() * torch.arange(50) + w.sin()).sum().backward()
    before = w.detach().clone()
    opt.step()
    precond = cn.diagonal_preconditioner(opt)[id(w)]
    state, group = opt.state[w], opt.param_groups[0]
    if "exp_avg" in state:
        direction = state["exp_avg"] / (1 - group["betas"][0] ** float(state["step"]))
    else:
        direction = w.grad
    torch.testing.assert_close(before - w.detach(), precond * direction, rtol=1e-9, atol=1e-12)


def test_the_preconditioner_is_refused_for_an_optimizer_without_one():
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="momentum_buffer"):
        cn.diagonal_preconditioner(opt)


def _fit(mnist_root, measures):
    """Adam on 1500 examples for 2 epochs, validated (and measured) every 300 examples."""
    from functools import partial

    from descent.nets import MLP

    return measured_fit(mnist_root, partial(MLP, hidden=[64, 64]), partial(torch.optim.Adam, lr=0.003), measures)


def test_measuring_b_noise_and_b_precond_leaves_the_run_unchanged(mnist_root):
    plain, without = _fit(mnist_root, [])
    measured, with_it = _fit(
        mnist_root,
        [
            cn.HessianNoiseAtTargets([0.5, 0.8, 0.999], groups=8, subset=256),
            cn.PreconditionedNoiseAtTargets([0.5, 0.8, 0.999], blocks=8),
        ],
    )
    assert len(without) == len(with_it) > 5
    for a, b in zip(without, with_it, strict=True):
        assert torch.equal(a, b)  # bit for bit: weights, Adam's moments and step, the RNG
    logged = measured.latest
    for name in (cn.B_NOISE, cn.B_NOISE_SE, cn.B_PRECOND, cn.B_PRECOND_SE):
        assert logged[f"{name}/0.5"] > 0 and logged[f"{name}/0.8"] > 0, name
        assert f"{name}/0.999" not in logged  # never reached
    assert cn.B_NOISE not in plain.latest
    assert measured.measures[0].state_dict() == {"crossed": [0.5, 0.8]}


RUN = [
    "optimizer=adam",
    "model.hidden=[64,64]",
    "data.limit_train=2000",
    "data.val_size=500",
    "trainer.max_epochs=3",
    "trainer.val_every_examples=200",
    "sweep.targets=[0.5]",
    "sweep.target_acc=0.7",
    "sweep.objective=target/updates",
    "trainer.noise_scale=false",
    "trainer.noise_hessian_at_targets=true",
    "trainer.noise_preconditioned_at_targets=true",
    "trainer.noise_hessian_subset=500",
]


def test_a_run_logs_b_noise_and_b_precond_at_its_target_crossings(tmp_path, store):
    train(*RUN, cwd=tmp_path, store=store)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["val/acc"] >= 0.7
    for acc in ("0.5", "0.7"):
        step = m[f"target/examples/{acc}"]
        for name in (
            cn.B_NOISE,
            cn.B_NOISE_SE,
            cn.GRAD_H_GRAD,
            cn.TRACE_H_COV,
            cn.B_PRECOND,
            cn.B_PRECOND_SE,
            cn.GRAD_P_GRAD,
            cn.TRACE_P_COV,
        ):
            [point] = client.get_metric_history(run.info.run_id, f"{name}/{acc}")
            assert point.step == step, (name, acc)  # the crossing's validation point, once
        assert m[f"{cn.TRACE_H_COV}/{acc}"] > 0 and m[f"{cn.B_PRECOND}/{acc}"] > 0 and m[f"{cn.B_PRECOND_SE}/{acc}"] > 0
        # on 1500 examples B_noise (~10³ here) is at the edge of what the groups resolve: a value where the
        # estimate of GᵀHG is positive, NaN (not a number of no meaning) where it is not
        b_noise, quad = m[f"{cn.B_NOISE}/{acc}"], m[f"{cn.GRAD_H_GRAD}/{acc}"]
        assert b_noise == pytest.approx(m[f"{cn.TRACE_H_COV}/{acc}"] / quad) if quad > 0 else math.isnan(b_noise)
    assert run.data.params["trainer.noise_hessian_at_targets"] == "True"


def test_both_are_off_by_default_and_their_keys_are_checked():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from descent.config import ConfigError, validate

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train")
        assert cfg.trainer.noise_hessian_at_targets is False and cfg.trainer.noise_preconditioned_at_targets is False
        bad = compose("train", ["trainer.noise_hessian_at_targets=3", "trainer.noise_hessian_subset=0"])
    with pytest.raises(ConfigError) as e:
        validate(bad)
    assert "trainer.noise_hessian_at_targets=3: must be true or false" in str(e.value)
    assert "trainer.noise_hessian_subset=0: must be an integer >= 2" in str(e.value)


def test_the_muon_preset_puts_only_the_hidden_to_hidden_matrix_on_muon_and_measures_on_the_reference_run():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from conftest import ROOT
    from descent.config import ConfigError, validate

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose(
            "train",
            ["experiment=batch_scaling_muon", "optimizer=muon_mlp2", "trainer.noise_at_targets=true"],
            return_hydra_config=True,
        )
        plain = compose("train", ["optimizer=muon_mlp2"])  # the book's one hidden layer: no 4.weight
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        assert cfg.trainer.noise_hessian_at_targets is True and cfg.trainer.noise_preconditioned_at_targets is True
        with open_dict(cfg):
            cfg.trainer.noise_at_targets = False  # every trial but the reference
        assert cfg.trainer.noise_hessian_at_targets is False and cfg.trainer.noise_preconditioned_at_targets is False
        net = instantiate(cfg.model)
        opt = instantiate(cfg.optimizer)(net.named_parameters())
    finally:
        HydraConfig.instance().cfg = None
    assert [tuple(p.shape) for g in opt.muon.param_groups for p in g["params"]] == [(512, 512)]
    assert sorted(tuple(p.shape) for g in opt.adamw.param_groups for p in g["params"]) == [
        (10,),
        (10, 512),
        (512,),
        (512,),
        (512, 784),
    ]
    assert opt.adamw.param_groups[0]["lr"] == opt.muon.param_groups[0]["lr"] == cfg.optimizer.lr
    with pytest.raises(ConfigError, match="'4.weight' names no parameter"):
        validate(plain)

"""The chapter's presets end to end at a tiny size, in this process (python src/train.py -m as typed, without
the start-up of a new interpreter): experiment=local_minima, step_size and edge_of_stability, each ending with
its figure on the sweep's parent run; the loop's numbers against a plain-python trajectory and a measurement
recomputed from the final weights."""

import logging
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import DATA, ROOT, sqlite_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# the edge_of_stability preset on 128 examples, its sharpness measured on 64 of them
EDGE = (
    "experiment=edge_of_stability",
    f"data.root={DATA}",
    "logger.log_model=false",
    "data.limit_train=128",
    "trainer.sharpness_subset=64",
)


def with_final_weights(net, run):
    """`net` holding a run's final weights, from its last checkpoint."""
    ckpt = torch.load(Path(run.data.tags["hydra.output_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()})
    return net


def multirun(tmp_path, monkeypatch, *overrides):
    """`python src/train.py -m <overrides>` in this process, on a store of its own; returns (client, parent,
    children by job number)."""
    from hydra.core.global_hydra import GlobalHydra

    store = sqlite_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(
        sys,
        "argv",
        ["src/train.py", "-m", f"hydra.sweep.dir={tmp_path}/sweep", "trainer.progress_bar=false", *overrides],
    )
    # what a run sets for its own process, put back for the tests that follow in this one: the environment,
    # logging (Hydra's job logging), torch's threads (descent/engine/threads.py)
    environ, root = dict(os.environ), logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / "src" / "train.py"), run_name="__main__")  # as `python src/train.py` runs it
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(environ)
        root.handlers[:], root.level = handlers, level
        torch.set_num_threads(threads)
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [parent] = [r for r in runs if r.data.tags.get("descent.sweep") == "true"]
    children = sorted(
        [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id],
        key=lambda r: int(r.data.tags["hydra.job.num"]),
    )
    return client, parent, children


def figure_on_parent(client, parent, name: str) -> str:
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}.png", f"report/{name}.md", "report/convergence.png"} <= logged
    png = Path(client.download_artifacts(parent.info.run_id, f"report/{name}.png"))
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    return Path(client.download_artifacts(parent.info.run_id, f"report/{name}.md")).read_text()


def values(client, run, key):
    return np.array([m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)])


def heavy_ball(w, lr, momentum, updates, tilt=0.25):
    """torch.optim.SGD's momentum on f(w) = w^4/4 - w^2/2 - tilt w, in plain python floats."""
    path, v = [], None
    for _ in range(updates):
        g = w**3 - w - tilt
        v = g if v is None else momentum * v + g
        w -= lr * v
        path.append(w)
    return path


def test_local_minima_momentum_rolls_past_the_local_minimum_as_the_plain_python_trajectory_does(tmp_path, monkeypatch):
    # momentum 0 and 0.9 at lr 0.01, and 0.9's control: plain SGD at 0.01 / (1 - 0.9) = 0.1
    client, parent, children = multirun(
        tmp_path,
        monkeypatch,
        "experiment=local_minima",
        "data.n_train=300",
        "arm={momentum:0.0,lr:0.01},{momentum:0.9,lr:0.01},{momentum:0.0,lr:0.1}",
        "draw={noise:0.0,seed:0}",
    )
    assert parent.info.status == "FINISHED" and len(children) == 3
    for run, ends in zip(children, ("local", "global", "local")):
        momentum, lr = float(run.data.params["optimizer.momentum"]), float(run.data.params["optimizer.lr"])
        expected = heavy_ball(-2.0, lr, momentum, 300)
        w = values(client, run, "toy/w")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "toy/w")] == list(range(1, 301))
        assert w == pytest.approx(expected, abs=2e-4)  # float32 in the loop, float64 here
        minimum = {"local": -0.8376, "global": 1.1072}[ends]
        assert w[-1] == pytest.approx(minimum, abs=0.02)
        assert values(client, run, "toy/step")[0] == pytest.approx(abs(expected[0] + 2.0), rel=1e-4)
        f = lambda w: w**4 / 4 - w**2 / 2 - 0.25 * w
        assert values(client, run, "val/loss")[-1] == pytest.approx(f(w[-1]), abs=1e-5)
        assert "trajectory.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    table = figure_on_parent(client, parent, "local_minima")
    assert "| 0 | momentum | 0.01 | 0 | 1 | 0/1 | 1/1 | 0/1 |" in table
    assert "| 0.9 | momentum | 0.01 | 0 | 1 | 1/1 | 0/1 | 0/1 |" in table
    assert "| 0.9 | plain SGD | 0.1 | 0 | 1 | 0/1 | 1/1 | 0/1 |" in table  # the same step, without the inertia


def preset_jobs(preset: str) -> list:
    """The configs of the jobs `python src/train.py -m experiment=<preset>` runs: its sweep's grid (Hydra's
    BasicSweeper), each job composed as Hydra composes it."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        [jobs] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
        return [compose("train", overrides=[f"experiment={preset}", *job]) for job in jobs]


def test_local_minima_runs_a_plain_sgd_control_at_lr_over_1_minus_beta_for_each_momentum_and_noise_free_cells_once():
    jobs = [
        (float(c.optimizer.momentum), float(c.optimizer.lr), float(c.data.noise), int(c.seed))
        for c in preset_jobs("local_minima")
    ]
    assert len(jobs) == len(set(jobs))  # no job runs twice
    base = {lr for m, lr, _, _ in jobs if m > 0}
    assert len(base) == 1
    (lr,) = base
    momenta = {m for m, *_ in jobs if m > 0}
    assert momenta == {0.5, 0.8, 0.85, 0.9, 0.95}
    for noise, seeds in ((0.0, {0}), (2.0, {0, 1, 2})):
        for beta in momenta | {0.0}:
            assert {s for m, l, n, s in jobs if (m, l, n) == (beta, lr, noise)} == seeds
            control = [s for m, l, n, s in jobs if m == 0 and n == noise and l == pytest.approx(lr / (1 - beta))]
            assert set(control) == seeds and len(control) == len(seeds)


def test_step_size_sets_the_learning_rate_from_2_over_L_and_marks_the_divergent_one(tmp_path, monkeypatch):
    # the 2-D surface (the local_minima test draws the 1-D curve); 2/L = 2/1001.6 on Rosenbrock
    client, parent, children = multirun(
        tmp_path, monkeypatch, "experiment=step_size", "data.n_train=150", "model=rosenbrock", "lr_ratio=0.5,3.0"
    )
    for run, ratio in zip(children, (0.5, 3.0)):
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(ratio * 2 / 1001.6006392, rel=1e-6)
        assert run.data.params["model.start"] == "[-1.5, 2.0]"  # the preset's start for this model
        assert (run.info.status, run.data.tags.get("diverged")) == (
            ("FAILED", "true") if ratio == 3.0 else ("FINISHED", None)
        )
    table = figure_on_parent(client, parent, "step_size")
    assert table.count("| diverged (update") == 1 and "| rosenbrock | 0.0009984 | 0.5 |" in table


def gradient_descent_updates_to(w, lr, tol, f_star, updates, tilt=0.25):
    """The first update after which plain gradient descent on the double well has f(w) - f* < tol, in
    python floats (None within `updates`)."""
    for n in range(1, updates + 1):
        w -= lr * (w**3 - w - tilt)
        if w**4 / 4 - w**2 / 2 - tilt * w - f_star < tol:
            return n
    return None


def test_step_size_tabulates_the_updates_to_tolerance_that_closed_form_gradient_descent_takes(tmp_path, monkeypatch):
    from descent.reports.pictures import TOLERANCE
    from descent.nets.toy import LOSSES

    client, parent, children = multirun(
        tmp_path, monkeypatch, "experiment=step_size", "data.n_train=60", "model=double_well", "lr_ratio=0.01,0.3,0.95"
    )
    L, w_star = LOSSES["double_well"].L, LOSSES["double_well"].minima["global"][0]
    f_star = w_star**4 / 4 - w_star**2 / 2 - 0.25 * w_star
    table = figure_on_parent(client, parent, "step_size")
    counts = {}
    for ratio in (0.01, 0.3, 0.95):
        lr = ratio * 2 / L
        counts[ratio] = gradient_descent_updates_to(1.6, lr, TOLERANCE, f_star, 60)
        shown = "not in 60" if counts[ratio] is None else str(counts[ratio])
        assert f"| double_well | {lr:.4g} | {ratio:.3g} | {shown} |" in table
    assert counts == {0.01: None, 0.3: 3, 0.95: 37}  # the minimum near 1/L, as the quadratic's |1 - lr L| says
    assert "- double_well: 0.3 (3) < 0.95 (37) < 0.01 (f - f* =" in table


def test_edge_of_stability_logs_sharpness_without_changing_the_training(tmp_path, monkeypatch):
    client, parent, children = multirun(
        tmp_path,
        monkeypatch,
        *EDGE,
        "trainer.max_epochs=4",
        "optimizer.lr=0.5",
        "model.loss=cross_entropy",
        "trainer.sharpness_every=2,null",
    )
    measured, plain = children
    assert values(client, measured, "train/loss") == pytest.approx(values(client, plain, "train/loss"), rel=0)
    history = client.get_metric_history(measured.info.run_id, "sharpness/lambda_max")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [128, 256, 512]  # updates 1, 2, 4
    assert set(values(client, measured, "sharpness/threshold")) == {4.0}  # 2/η
    assert "sharpness/lambda_max" not in plain.data.metrics
    # the last value, recomputed from the run's final weights (its last checkpoint)
    from descent.data import load_split
    from descent.measure.sharpness import lambda_max
    from descent.nets import MLP
    import torch.nn.functional as F

    net = with_final_weights(MLP(), measured)
    x, y = load_split(DATA, train=True)
    expected, _ = lambda_max(net, F.cross_entropy, x[:64], y[:64])
    assert measured.data.metrics["sharpness/lambda_max"] == pytest.approx(expected, rel=1e-3)
    text = figure_on_parent(client, parent, "edge_of_stability")
    assert "| cross_entropy | 0.5 | 4 |" in text


def test_edge_of_stability_sweeps_rates_far_below_the_initial_sharpness_under_cross_entropy_and_mse():
    jobs = [(c.model.loss, float(c.optimizer.lr)) for c in preset_jobs("edge_of_stability")]
    assert {loss for loss, _ in jobs} == {"cross_entropy", "mse"}
    for loss in ("cross_entropy", "mse"):
        thresholds = sorted(2 / lr for l, lr in jobs if l == loss)
        # 2/η far above λ_max after the first update (~7.6 under cross-entropy, ~54 under mse at lr 0.01), near it
        # and below it
        assert [t for t in thresholds if t > 60] and [t for t in thresholds if 8 < t < 40] and thresholds[0] < 7


def test_model_loss_mse_trains_and_measures_the_sharpness_of_the_squared_error(tmp_path, monkeypatch):
    from descent.data import load_split
    from descent.measure.sharpness import lambda_max
    from descent.nets import MLP, mse

    client, parent, [run] = multirun(
        tmp_path,
        monkeypatch,
        *EDGE,
        "trainer.max_epochs=3",
        "optimizer.lr=0.01",
        "model.loss=mse",
        "trainer.sharpness_every=1",
    )
    assert run.data.params["model.loss"] == "mse" and "train/acc" in run.data.metrics  # accuracy of the scores
    assert values(client, run, "sharpness/threshold") == pytest.approx([200.0] * 3)  # updates 1, 2, 3
    x, y = load_split(DATA, train=True)
    net = with_final_weights(MLP(loss="mse"), run)
    # the loss half the squared error against one-hot targets, and its Hessian the one measured
    out = net(x[:128]).detach()
    assert float(mse(out, y[:128])) == pytest.approx(
        float(0.5 * ((out - torch.eye(10)[y[:128]]) ** 2).sum(1).mean()), rel=1e-6
    )
    expected, _ = lambda_max(net, mse, x[:64], y[:64])
    assert run.data.metrics["sharpness/lambda_max"] == pytest.approx(expected, rel=1e-3)
    assert "| mse | 0.01 | 200 |" in figure_on_parent(client, parent, "edge_of_stability")

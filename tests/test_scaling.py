"""The batch-size scaling study (issue 17): the fit recovers a known S_min and E_min, and a tiny
experiment=batch_scaling sweep runs end to end (a grid of Optuna studies, runs stopped at their target,
the scaling report on the parent). Real Hydra, real optuna storage, real MLflow store; 600 examples."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from conftest import ROOT, train
from descent.measure.scaling import Run, analyse, b_crit, bootstrap, fit


def test_fit_recovers_s_min_and_e_min_from_points_on_the_curve():
    s_min, e_min = 300.0, 60000.0  # B_crit 200
    b = np.array([1, 4, 16, 64, 256, 1024, 4096])
    rng = np.random.default_rng(0)
    exact = fit(b, s_min + e_min / b)
    assert exact == pytest.approx((s_min, e_min), rel=1e-9)
    noisy = fit(b, (s_min + e_min / b) * rng.lognormal(0, 0.05, len(b)))  # 5 % scatter, as best-of-n trials have
    assert noisy[0] == pytest.approx(s_min, rel=0.1) and noisy[1] == pytest.approx(e_min, rel=0.1)
    assert b_crit(*noisy) == pytest.approx(200, rel=0.15)
    assert fit([64, 64], [10, 12]) != fit([64, 64], [10, 12])  # one batch size fits nothing: NaN


def test_the_bootstrap_over_seeds_covers_the_true_s_min_and_e_min_of_synthetic_cells():
    # 9 batch sizes x 3 seeds, each seed's updates the curve's times 10 % lognormal noise (the seed-to-seed
    # spread measured at B = 128): over 150 synthetic studies the 95 % interval holds the truth >= 90 % of the time
    s_min, e_min = 300.0, 60000.0
    sizes = [1, 4, 16, 64, 256, 1024, 4096, 16384, 50000]
    rng, covered, estimates = np.random.default_rng(1), np.zeros(3), []
    repeats = 150
    for _ in range(repeats):
        cells = {b: list((s_min + e_min / b) * rng.lognormal(0, 0.1, 3)) for b in sizes}
        point = fit(sizes, [np.median(v) for v in cells.values()])
        estimates.append(point)
        boot = bootstrap(cells, rng, 300)
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        covered += (lo <= [s_min, e_min, e_min / s_min]) & ([s_min, e_min, e_min / s_min] <= hi)
    assert np.all(covered / repeats >= 0.9), covered / repeats
    # and the fit recovers them: its median over the synthetic studies within 3 %
    assert np.median(estimates, axis=0) == pytest.approx([s_min, e_min], rel=0.03)


def test_a_point_is_the_seeds_median_at_the_rate_chosen_on_the_first_seed():
    # seed 0 ran three rates; 0.1 was fastest to 0.97 (by luck: 90 against the 100 it needs), 0.3 to 0.95;
    # seeds 1 and 2 ran at each chosen rate. Each target's point is its rate's median over the three seeds
    runs = [Run("sgd", 64, 0.03, 0, "FINISHED", {0.95: 60, 0.97: 130}),
            Run("sgd", 64, 0.1, 0, "FINISHED", {0.95: 50, 0.97: 90}),
            Run("sgd", 64, 0.3, 0, "FINISHED", {0.95: 40, 0.97: 95}),
            Run("sgd", 64, 0.1, 1, "FINISHED", {0.95: 52, 0.97: 100}),
            Run("sgd", 64, 0.1, 2, "FINISHED", {0.95: 55, 0.97: 104}),
            Run("sgd", 64, 0.3, 1, "FINISHED", {0.95: 44, 0.97: 120}),
            Run("sgd", 64, 0.3, 2, "FINISHED", {0.95: 47}),   # missed 0.97 in its budget
            Run("sgd", 64, 0.1, 0, "FINISHED", {0.95: 50, 0.97: 90}, reference=True)]  # not a trial
    rows, _, _ = analyse(runs, n_boot=10)
    by_target = {r["target"]: r for r in rows}
    assert by_target[0.97]["best_lr"] == 0.1 and by_target[0.97]["updates_to_target"] == 100  # median(90,100,104)
    assert by_target[0.95]["best_lr"] == 0.3 and by_target[0.95]["updates_to_target"] == 44  # median(40,44,47)
    assert by_target[0.97]["seeds"] == 3 and by_target[0.97]["trials"] == 7


def test_tiny_batch_scaling_sweep_end_to_end(tmp_path, store, mnist_root):
    proc = train("experiment=batch_scaling_quick", "data.limit_train=600", "data.val_size=300",
                 "sweep.target_acc=0.6", "hydra.sweeper.n_trials=2", "trainer.max_epochs=3", "trainer.max_updates=60",
                 "trainer.val_every_examples=60", "trainer.noise_probe=128",
                 "hydra.sweeper.grid={optimizer: sgd_momentum, data.batch_size: '10,50'}",
                 "hydra.sweeper.params={optimizer.lr: 'choice(0.0003,0.3)'}",
                 cwd=tmp_path, store=store, multirun=True)
    out = proc.stdout + proc.stderr
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("batch_scaling_quick")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("descent.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED", out[-3000:]
    # one study per batch size, 2 trials each, every trial a child run carrying the noise scale
    cells = {"batch_scaling_quick-sgd_momentum-10", "batch_scaling_quick-sgd_momentum-50"}
    assert {r.data.tags["optuna.study"] for r in children} == cells and len(children) == 4
    tried = [[t.params["optimizer.lr"] for t in optuna.load_study(
        study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials] for name in sorted(cells)]
    assert [sorted(lrs) for lrs in tried] == [[0.0003, 0.3]] * 2  # the grid sampler: every cell tries every lr
    for r in children:
        assert "noise/b_simple" in r.data.metrics and r.data.params["trainer.noise_scale"] == "True"
    reached = [r for r in children if "target/updates" in r.data.metrics]
    assert reached, out[-3000:]
    for r in reached:  # it stopped at its target: its last validation point is the target's
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")]
        assert steps[-1] == r.data.metrics["target/examples"] and r.data.metrics["val/acc"] >= 0.6
        assert r.data.metrics["progress/updates"] == r.data.metrics["target/updates"]
    # a trial that has spent as many updates as its cell's best took, without the target, is pruned there
    by_cell = {}
    for r in sorted(children, key=lambda r: int(r.data.tags["optuna.trial"])):
        by_cell.setdefault(r.data.tags["optuna.study"], []).append(r)
    bounded = [(first, second) for first, second in by_cell.values() if "target/updates" in first.data.metrics]
    assert bounded, "the seeded grid order runs lr 0.3 (which reaches the target) first in neither cell"
    for first, second in bounded:  # lr 0.0003 cannot reach 0.6 within 60 updates: it stops at the first bound
        assert second.data.tags.get("optuna.pruned") == "true", out[-3000:]
        batch = int(second.data.params["data.batch_size"])  # it stopped at its last validation point
        spent = client.get_metric_history(second.info.run_id, "val/acc")[-1].step // batch  # (600 = k * batch)
        best = first.data.metrics["target/updates"]
        assert best <= spent < best + 60 // batch + 1 and spent < min(60, 3 * 600 // batch)  # before its budget
    metrics = parent.data.metrics
    assert np.isfinite(metrics["scaling.s_min.sgd_momentum"]) and np.isfinite(metrics["scaling.e_min.sgd_momentum"])
    assert "scaling.b_crit.sgd_momentum" in metrics or metrics["scaling.s_min.sgd_momentum"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/scaling.png", "report/scaling.md", "report/scaling.csv"} <= artifacts
    assert (tmp_path / "outputs" / "sweep" / "scaling.png").stat().st_size > 10000
    # `compare.py --scaling --with RUN_ID` joins another sweep's trials (here the same sweep's again: twice as many)
    out = tmp_path / "joined"
    subprocess.run([sys.executable, str(ROOT / "src/compare.py"), "--scaling", "--parent", parent.info.run_id,
                    "--with", parent.info.run_id, "--out", str(out), "--tracking-uri", store], check=True)
    assert "8 runs, 2 (optimizer, batch size) cells" in (out / "scaling.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "src/compare.py"), "--scaling", "--parent", parent.info.run_id,
                          "--with", "0" * 32, "--out", str(out), "--tracking-uri", store],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and f"--with {'0' * 32}: no such sweep run" in bad.stderr, bad.stderr[-2000:]
    # the search report: one study per cell, trials numbered within it, each cell's best in bold
    rows = [line.split("|")[1:-1] for line in (tmp_path / "outputs/sweep/search.md").read_text().splitlines()
            if line.startswith("| batch_scaling_quick-")]
    assert sorted((c[0].strip(), int(c[1])) for c in rows) == [(cell, n) for cell in sorted(cells) for n in (0, 1)]
    assert {c[0].strip() for c in rows if "**" in c[4]} == {r.data.tags["optuna.study"] for r in reached}

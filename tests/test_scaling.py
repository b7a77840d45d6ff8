"""The batch-size scaling study: the fit recovers a known S_min and E_min and its bootstrap over seeds covers
them, a point is the seeds' median at the rate chosen on the first seed, and a tiny experiment=batch_scaling
study runs the protocol end to end (a grid of Optuna studies, runs stopped at their highest target, seeds at
the chosen rates, the reference run, the scaling report on the parent) and goes on where it stopped. Real
Hydra, real optuna storage, real MLflow store; 600 examples."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from conftest import compare, train, transfer
from descent.reports.scaling import Run, analyse, b_crit, bootstrap, fit
from descent.tracking.names import target_key


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
    runs = [
        Run("sgd", 64, 0.03, 0, "FINISHED", {0.95: 60, 0.97: 130}),
        Run("sgd", 64, 0.1, 0, "FINISHED", {0.95: 50, 0.97: 90}),
        Run("sgd", 64, 0.3, 0, "FINISHED", {0.95: 40, 0.97: 95}),
        Run("sgd", 64, 0.1, 1, "FINISHED", {0.95: 52, 0.97: 100}),
        Run("sgd", 64, 0.1, 2, "FINISHED", {0.95: 55, 0.97: 104}),
        Run("sgd", 64, 0.3, 1, "FINISHED", {0.95: 44, 0.97: 120}),
        Run("sgd", 64, 0.3, 2, "FINISHED", {0.95: 47}),  # missed 0.97 in its budget
        Run("sgd", 64, 0.1, 0, "FINISHED", {0.95: 50, 0.97: 90}, reference=True),
    ]  # not a trial
    rows, _, _ = analyse(runs, n_boot=10)
    by_target = {r["target"]: r for r in rows}
    assert by_target[0.97]["best_lr"] == 0.1 and by_target[0.97]["updates_to_target"] == 100  # median(90,100,104)
    assert by_target[0.95]["best_lr"] == 0.3 and by_target[0.95]["updates_to_target"] == 44  # median(40,44,47)
    assert by_target[0.97]["seeds"] == 3 and by_target[0.97]["trials"] == 7


PROTOCOL = [
    "experiment=batch_scaling_quick",
    "data.limit_train=600",
    "data.val_size=300",
    "sweep.target_acc=0.6",
    "sweep.targets=[0.5]",
    "trainer.max_epochs=3",
    "trainer.max_updates=60",
    "trainer.val_every_examples=60",
    "hydra.sweeper.grid={optimizer: sgd_momentum, data.batch_size: '10,50'}",
    "seed=choice(0,1)",
    "hydra.sweeper.sampler.max_search=3",
    "hydra.sweeper.sampler.reference={data.batch_size: 50}",
]


def test_tiny_batch_scaling_study_runs_the_protocol_end_to_end_and_goes_on_where_it_stopped(
    tmp_path, store, mnist_root
):
    # the quick preset as shipped but for size: 600 examples, targets 0.5 and 0.6, two seeds, 3 search trials a
    # cell, the reference run in the B = 50 cell
    proc = train(*PROTOCOL, cwd=tmp_path, store=store, multirun=True)
    out = proc.stdout + proc.stderr
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("batch_scaling_quick")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("descent.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED", out[-3000:]
    cells = {"batch_scaling_quick-sgd_momentum-10", "batch_scaling_quick-sgd_momentum-50"}
    assert {r.data.tags["optuna.study"] for r in children} == cells
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    keys = [target_key("updates", 0.5), target_key("updates", 0.6)]
    for name in sorted(cells):
        trials = optuna.load_study(study_name=name, storage=storage).trials
        role = lambda t: t.user_attrs["descent.role"]
        search = [t for t in trials if role(t) == "search"]
        assert len(search) == 3 and {t.params["seed"] for t in search} == {0}
        chosen = {
            min((t.user_attrs[k], t.params["optimizer.lr"]) for t in search if k in t.user_attrs)[1] for k in keys
        }
        measured = [t for t in trials if role(t) == "seed"]  # each chosen rate once more, on seed 1
        assert sorted((t.params["optimizer.lr"], t.params["seed"]) for t in measured) == [
            (lr, 1) for lr in sorted(chosen)
        ]
        assert all(t.state.name != "PRUNED" for t in measured)
        for t in measured:  # a seed run stops at the highest target its rate was chosen for, and says so
            lr = t.params["optimizer.lr"]
            stop = max(
                acc
                for acc, k in zip((0.5, 0.6), keys)
                if min((u.user_attrs[k], u.params["optimizer.lr"]) for u in search if k in u.user_attrs)[1] == lr
            )
            assert t.user_attrs.get("descent.stop", 0.6) == stop
            [r] = [
                r
                for r in children
                if r.data.tags.get("optuna.trial") == str(t.number) and r.data.tags["optuna.study"] == name
            ]
            assert float(r.data.params["sweep.target_acc"]) == stop
            assert all(float(k.rsplit("/", 1)[1]) <= stop for k in r.data.metrics if k.startswith("target/updates/"))
        reference = [t for t in trials if role(t) == "reference"]
        assert len(reference) == (name.endswith("-50"))
    # B = 50's search trials get a deadline at the lowest target: 4x the fewest updates B = 10 took to it (the
    # preset's neighbour_bound); B = 10 has no smaller cell, and runs that measure are never pruned
    small, large = (optuna.load_study(study_name=n, storage=storage).trials for n in sorted(cells))
    bound = {"0.5": 4.0 * min(t.user_attrs[keys[0]] for t in small if keys[0] in t.user_attrs)}
    for t in large:
        assert t.user_attrs.get("descent.bound") == (bound if t.user_attrs["descent.role"] == "search" else None)
    assert not any("descent.bound" in t.user_attrs for t in small)
    for r in children:  # each target's first crossing, once; a run that reached the highest stopped there
        for k in keys:
            if k in r.data.metrics:
                assert len(client.get_metric_history(r.info.run_id, k)) == 1
        if "target/updates" in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")]
            assert steps[-1] == r.data.metrics["target/examples"] == r.data.metrics[target_key("examples", 0.6)]
            assert r.data.metrics["target/examples"] == r.data.metrics["target/updates"] * int(
                r.data.params["data.batch_size"]
            )
        if r.data.tags.get("optuna.pruned") == "true":
            assert "target/updates" not in r.data.metrics
    [ref] = [r for r in children if r.data.params["trainer.noise_at_targets"] == "True"]
    assert ref.data.params["data.batch_size"] == "50" and ref.data.params["seed"] == "0"
    assert ref.data.metrics["noise/b_simple/0.5"] > 0 and ref.data.metrics["noise/b_simple_se/0.5"] > 0
    metrics = parent.data.metrics
    for key in ("s_min", "e_min"):
        for acc in ("0.5", "0.6"):
            assert np.isfinite(metrics[f"scaling.{key}.sgd_momentum.{acc}"])
    assert metrics["scaling.b_simple.sgd_momentum.0.5"] == ref.data.metrics["noise/b_simple/0.5"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/scaling.png", "report/scaling.md", "report/scaling.csv"} <= artifacts
    report = (tmp_path / "outputs" / "sweep" / "scaling.md").read_text()
    assert "bootstrap over seeds" in report and "| sgd_momentum | 50 | 0.6 |" in report
    assert (tmp_path / "outputs" / "sweep" / "scaling.png").stat().st_size > 10000
    # the same command again: every cell is done, nothing new runs, the parent is the same
    again = train(*PROTOCOL, cwd=tmp_path, store=store, multirun=True)
    assert (again.stdout + again.stderr).count("its sampler has nothing left to run") == 2
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    # ... and in another folder (another machine) from the study's exported file: the protocol reads the same
    # trials there, so it has nothing left to run either
    moved, saved = tmp_path / "moved", tmp_path / "study.jsonl"
    moved.mkdir()
    transfer("export", str(tmp_path / "optuna.db"), str(saved), check=True)
    transfer("import", str(saved), str(moved / "optuna.db"), check=True)
    there = train(*PROTOCOL, cwd=moved, store=store, multirun=True)
    assert (there.stdout + there.stderr).count("its sampler has nothing left to run") == 2
    new = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in {x.info.run_id for x in runs}]
    assert [r.data.tags.get("descent.sweep") for r in new] == ["true"]  # its parent, no trial
    clash = transfer("import", str(saved), str(moved / "optuna.db"), capture_output=True, text=True)
    assert clash.returncode == 2 and "already in the destination" in clash.stderr
    # `compare.py --scaling --with RUN_ID` joins another sweep's runs (here the same sweep's again: twice as many)
    joined = tmp_path / "joined"
    scaling = ("--scaling", "--parent", parent.info.run_id, "--out", str(joined), "--tracking-uri", store)
    compare(*scaling, "--with", parent.info.run_id, check=True)
    assert f"{2 * len(children)} runs, 2 (optimizer, batch size) cells" in (joined / "scaling.md").read_text()
    bad = compare(*scaling, "--with", "0" * 32, capture_output=True, text=True)
    assert bad.returncode == 2 and f"--with {'0' * 32}: no such sweep run" in bad.stderr, bad.stderr[-2000:]
    # the report's scaling_trials.csv redraws it with no store: the same table, the same fits
    saved = tmp_path / "outputs" / "sweep" / "scaling_trials.csv"
    assert "report/scaling_trials.csv" in artifacts
    alone = tmp_path / "alone"
    compare("--scaling", "--trials", str(saved), "--out", str(alone), "--tracking-uri", "file:///nowhere", check=True)
    assert (alone / "scaling.csv").read_text() == (tmp_path / "outputs" / "sweep" / "scaling.csv").read_text()
    assert f"{len(children)} runs, 2 (optimizer, batch size) cells" in (alone / "scaling.md").read_text()


def test_the_report_sets_b_noise_and_b_precond_beside_b_simple_and_adamw_against_muon_per_batch_size():
    from descent.reports.scaling import ratios
    from descent.reports.scaling_render import markdown

    # adamw needs 2x muon's updates at B = 64 on every seed, the same at B = 512; the reference runs measured
    # B_simple, B_noise and (adamw only) B_precond at 0.9
    runs = []
    for opt, slow in (("adamw", 2.0), ("muon_mlp2", 1.0)):
        for b, s in ((64, 100.0), (512, 30.0)):
            for seed, jitter in enumerate((1.0, 1.1, 0.9)):
                factor = slow if b == 64 else 1.0
                runs.append(
                    Run(opt, b, 0.001, seed, "FINISHED", {0.9: s * factor * jitter}, {0.9: s * factor * jitter * b})
                )

    def reference(opt, updates, b_simple, **scales):  # the reference run at B = 64, which reached 0.9
        crossing = {0.9: updates}, {0.9: updates * 64}  # updates and examples at 0.9
        scales = {(name, 0.9): value for name, value in scales.items()}
        return Run(opt, 64, 0.001, 0, "FINISHED", *crossing, reference=True, noise={0.9: b_simple}, scales=scales)

    ref = reference("adamw", 200, (300.0, 20.0), b_noise=(120.0, 15.0), b_precond=(700.0, 50.0))
    ref_m = reference("muon_mlp2", 100, (280.0, 20.0), b_noise=(110.0, 14.0))
    rows, fits, noise = analyse(runs + [ref, ref_m], n_boot=50)
    assert noise["adamw", 0.9] | {} == {
        "b_simple": 300.0,
        "b_simple_se": 20.0,
        "b_noise": 120.0,
        "b_noise_se": 15.0,
        "b_precond": 700.0,
        "b_precond_se": 50.0,
        "batch_size": 64,
        "lr": 0.001,
    }
    assert "b_precond" not in noise["muon_mlp2", 0.9]
    pairs = {p["batch_size"]: p for p in ratios(rows, n_boot=200)}
    assert pairs[64]["ratio"] == pytest.approx(2.0) and pairs[512]["ratio"] == pytest.approx(1.0)
    assert pairs[64]["low"] > 1.0 and pairs[512]["low"] < 1.0 < pairs[512]["high"]
    text = markdown(rows, fits, noise, "# t", n_boot=50)
    assert "| adamw | 0.9 |" in text and "| 300 ± 20 | 120 ± 15 | 700 ± 50 |" in text
    assert "| muon_mlp2 | 0.9 |" in text and "| 280 ± 20 | 110 ± 14 | — |" in text
    assert "S_adamw/S_muon_mlp2 = E_adamw/E_muon_mlp2" in text and "| 64 | 0.9 | 2 [" in text
    assert ratios([r for r in rows if r["optimizer"] == "adamw"]) == []  # no Muon: no comparison


def test_the_reference_runs_noise_scales_are_read_from_the_store(store):
    from descent.reports.scaling import read_runs
    from descent.tracking.names import PARENT as PARENT_TAG

    client = MlflowClient(store)
    exp = client.create_experiment("scales")
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={PARENT_TAG: parent}).info.run_id
    for key, value in {
        "optimizer": "adamw",
        "data.batch_size": "64",
        "optimizer.lr": "0.001",
        "seed": "0",
        "trainer.noise_at_targets": "True",
    }.items():
        client.log_param(child, key, value)
    for key, value in {
        "target/updates/0.9": 200,
        "noise/b_simple/0.9": 300,
        "noise/b_simple_se/0.9": 20,
        "noise/b_noise/0.9": 120,
        "noise/b_noise_se/0.9": 15,
        "noise/b_precond/0.9": 700,
        "noise/b_precond_se/0.9": 50,
        "noise/b_noise": 120,
        "noise/grad_h_grad/0.9": 1.0,
    }.items():
        client.log_metric(child, key, value)
    [run] = read_runs(client, parent)
    assert run.reference and run.noise == {0.9: (300, 20)}
    assert run.scales == {("b_noise", 0.9): (120, 15), ("b_precond", 0.9): (700, 50)}


def test_a_study_at_one_batch_size_ranks_the_optimizers_per_target_and_fits_nothing(tmp_path):
    from descent.reports.scaling import Run, analyse, make_scaling_report, trial_rows
    from descent.reports.skeleton import write_csv
    from descent.reports.scaling_render import markdown, plot, ranking

    # muon's seeds all beat adam's; adam's and sgd's ranges overlap at 0.97 (sgd's fastest seed 390 < adam's 440)
    runs = []
    for opt, seeds in (("sgd", (600, 390, 700)), ("adam", (400, 440, 360)), ("muon_mlp2", (250, 275, 225))):
        for seed, s in enumerate(seeds):
            runs.append(
                Run(opt, 128, 0.01, seed, "FINISHED", {0.97: s}, {0.97: 128 * s}, val_every=512, val_share=0.02)
            )
    rows, fits, noise = analyse(runs, n_boot=20)
    ranked = [(q["optimizer"], q["s"], q["separated"]) for q in ranking(rows)]
    assert ranked == [("muon_mlp2", 250, True), ("adam", 400, False), ("sgd", 600, None)]
    text = markdown(rows, fits, noise, "# t", n_boot=20)
    assert "| 0.97 | 1 | muon_mlp2 | 0.01 | 250 | [225, 275] (3 seeds) | 1.00 | yes |" in text
    assert "| 0.97 | 2 | adam | 0.01 | 400 | [360, 440] (3 seeds) | 1.60 | no |" in text
    assert "S_min [95 %]" not in text and "S(B) is not fitted" in text
    assert len(plot(rows, fits, noise, "t").axes) == 1  # updates per target and optimizer, not the four S(B) panels
    write_csv(trial_rows(runs), tmp_path / "trials.csv")  # the sweep's closing line: no "B_crit nan [nan, nan]"
    summary = make_scaling_report(out_dir=tmp_path / "report", trial_files=(tmp_path / "trials.csv",))["summary"]
    assert summary.startswith("no B_crit: no optimizer has a target reached on every seed at two batch sizes")


def test_the_resolution_is_the_gap_between_checks_at_the_crossing():
    from descent.reports.scaling import Run, point

    def resolution(s, b, share):
        runs = [Run("sgd", b, 0.01, 0, "FINISHED", {0.97: s}, {0.97: s * b}, val_every=512, val_share=share)]
        return point(runs, 0.97)["resolution"]

    assert resolution(15000, 1, 0.02) == pytest.approx(512 / 15000)  # the fixed gap below 25600 examples: 3.4 %
    assert resolution(100000, 1, 0.02) == pytest.approx(0.02)  # then 2 % of the examples seen
    assert resolution(100000, 1, None) == pytest.approx(512 / 100000)  # a fixed gap throughout
    assert resolution(50, 16384, 0.02) == pytest.approx(1 / 50)  # at least one update


def test_a_cell_on_fewer_seeds_than_the_others_is_shown_but_left_out_of_the_fit():
    from descent.reports.scaling import Run, analyse
    from descent.reports.scaling_render import markdown

    # S = 100 + 10000/B on 3 seeds at B = 64 and 512; B = 4096 has one search trial so far, far off the curve
    runs = [
        Run("sgd", b, 0.1, seed, "FINISHED", {0.97: 100 + 10000 / b}, {0.97: (100 + 10000 / b) * b})
        for b in (64, 512)
        for seed in range(3)
    ]
    runs.append(Run("sgd", 4096, 0.1, 0, "FINISHED", {0.97: 900.0}, {0.97: 900.0 * 4096}))
    rows, fits, _ = analyse(runs, n_boot=20)
    assert {r["batch_size"]: r["in_fit"] for r in rows} == {64: True, 512: True, 4096: False}
    assert fits["sgd", 0.97]["points"] == 2
    assert fits["sgd", 0.97]["s_min"] == pytest.approx(100) and fits["sgd", 0.97]["e_min"] == pytest.approx(10000)
    assert "Left out of the fit (measured on fewer seeds" in markdown(rows, fits, {}, "# t", n_boot=20)
    assert "sgd B 4096 @ 0.97" in markdown(rows, fits, {}, "# t", n_boot=20)


def test_the_rate_rule_recovers_its_scale_from_rates_on_the_protocols_lattice():
    # rates drawn from ε(B) = 1.2 / (1 + 200/B), each rounded to the protocol's √2 lattice as a chosen rate is
    from descent.reports import rate_rule

    sizes = [1, 4, 16, 64, 128, 256, 1024, 4096]
    lattice = lambda x: math.sqrt(2) ** round(math.log(x, math.sqrt(2)))
    rates = [lattice(1.2 / (1 + 200 / b)) for b in sizes]
    right, wrong = rate_rule.fit(sizes, rates, scale=200.0), rate_rule.fit(sizes, rates, scale=2000.0)
    assert right["b_fit_low"] <= 200 <= right["b_fit_high"] and 100 < right["b_fit"] < 400
    assert right["miss_fit"] <= math.sqrt(2) and right["miss_scale"] <= math.sqrt(2)
    assert wrong["miss_scale"] > 2  # a scale 10x off misses the small-B rates by far more than a lattice step
    assert 0.6 < right["eps_max"] < 2.4
    # a rate that stops growing at B = 64 (as plain SGD's does here) puts the scale near 64, not above
    flat = [min(r, 0.5) for r in [b / 128 for b in sizes]]
    assert rate_rule.fit(sizes, flat)["b_fit"] < 128


def test_saved_trials_read_back_as_they_were_and_a_bad_file_names_its_line_and_column(tmp_path):
    from descent.reports.scaling import ReportError, read_trials, trial_rows
    from descent.reports.skeleton import write_csv

    runs = [
        Run("sgd", 64, 0.03, 0, "FINISHED", {0.95: 410.0, 0.98: 1203.0}, {0.95: 26240.0, 0.98: 76992.0}, 256, 0.02),
        Run("sgd", 64, 0.0424, 1, "FAILED", {}, {}, 256, 0.02),  # pruned: no crossing
        Run(
            "adam", 128, 0.001, 0, "FINISHED", {0.95: 90.0}, {0.95: 11520.0}, 256, 0.02, reference=True,
            noise={0.95: (310.5, 21.25)}, scales={("b_noise", 0.95): (120.0, 15.5), ("b_precond", 0.95): (700.0, 50.0)},
        ),
    ]  # fmt: skip
    path = tmp_path / "scaling_trials.csv"
    write_csv(trial_rows(runs), path)
    back = read_trials(path)
    assert back[1].updates == {} and back[1].lr == 0.0424
    assert back == runs
    text = path.read_text().replace("26240.0", "many", 1)
    path.write_text(text)
    with pytest.raises(ReportError, match=r"line 2: examples@0.95='many' is not a number"):
        read_trials(path)
    path.write_text("optimizer,lr\nsgd,0.1\n")
    with pytest.raises(ReportError, match="no column batch_size, seed, status"):
        read_trials(path)
    path.write_text("")
    with pytest.raises(ReportError, match="no trials in it"):
        read_trials(path)

"""The convergence report on a real sqlite MLflow store, filled through MlflowClient as train.py fills it."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from conftest import compare
from descent.reports import convergence as report
from descent.tracking.store import resolve_uri

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 3000  # examples per epoch in the fake runs; 2 epochs each
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_run(
    client,
    exp_id,
    parent_id,
    optimizer,
    batching,
    seed,
    *,
    start,
    train_steps,
    seconds,
    val_steps,
    val_acc,
    batch_size,
    train_loss=None,
    test=True,
    status="FINISHED",
    tags=None,
):
    """One child run with the metric contract of train.py: step = examples seen."""
    run = client.create_run(
        exp_id,
        start_time=start,
        run_name=f"{optimizer}-{batching}-s{seed}",
        tags={"mlflow.parentRunId": parent_id, **(tags or {})} if parent_id else tags,
    )
    rid = run.info.run_id
    params = {
        "optimizer": optimizer,
        "batching": batching,
        "model": "mlp",
        "data": "mnist",
        "seed": seed,
        "optimizer.lr": {"sgd": 0.1, "adam": 0.001, "rmsprop": 0.001}[optimizer],
        "data.batch_size": batch_size,
        "trainer.max_epochs": 2,
        "logger.experiment_name": "descent",
    }
    train_loss = train_loss or [2.0 / (1 + i) for i in range(len(train_steps))]
    points = []
    for i, step in enumerate(train_steps):
        points += [
            ("train/loss", train_loss[i], step),
            ("train/acc", 0.5 + 0.04 * i, step),
            ("progress/epoch", step / N_TRAIN, step),
            ("progress/updates", step // batch_size, step),
            ("progress/seconds", seconds[i], step),
        ]
    for step, acc in zip(val_steps, val_acc):
        points += [("val/acc", acc, step), ("val/loss", 1.0 - acc, step)]
    if test:
        end = train_steps[-1]
        points += [("test/acc", val_acc[-1] - 0.001, end), ("test/loss", 1.01 - val_acc[-1], end)]
    client.log_batch(
        rid,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric(k, float(v), start + 1000 + j, int(s)) for j, (k, v, s) in enumerate(points)],
    )
    client.set_terminated(rid, status)
    return rid


MINI = dict(batch_size=100, train_steps=[500 * i for i in range(1, 13)], val_steps=[1100, 2200, 3000, 4400, 6000])
OLD_ACC = [0.9, 0.95, 0.97, 0.98, 0.99]  # the old sweep's run and the runs outside any sweep


def log_mini(client, exp_id, parent_id, optimizer, seed, *, start, seconds, val_acc):
    """One minibatch child run (batch 100, 12 train points, 5 val points) through log_run."""
    return log_run(
        client, exp_id, parent_id, optimizer, "mini", seed, start=start, seconds=seconds, val_acc=val_acc, **MINI
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two sweeps in experiment 'descent' (an old one and the latest), and an experiment without sweeps."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("descent", artifact_location=str(root / "mlruns"))
    t0 = 1_700_000_000_000

    old = client.create_run(exp, start_time=t0, tags={"descent.sweep": "true"}, run_name="old sweep").info.run_id
    log_mini(client, exp, old, "rmsprop", 0, start=t0 + 1, seconds=[0.1 * i for i in range(1, 13)], val_acc=OLD_ACC)
    client.set_terminated(old)

    t1 = t0 + 3_600_000
    sweep_dir = root / "outputs" / "multiruns" / "sweep"
    parent = client.create_run(
        exp, start_time=t1, run_name="sweep", tags={"descent.sweep": "true", "hydra.sweep.dir": str(sweep_dir)}
    ).info.run_id
    i = np.arange(1, 13)
    mini = [  # (optimizer, seed, progress/seconds, val/acc)
        # sgd-mini: seed 0 reaches 0.97 at 2200 examples, seed 1 at 3000, seed 2 never
        ("sgd", 0, 0.3 * i + 0.01 * i**2, [0.90, 0.975, 0.98, 0.985, 0.99]),
        ("sgd", 1, 0.35 * i, [0.92, 0.96, 0.971, 0.98, 0.985]),
        ("sgd", 2, 0.32 * i, [0.85, 0.90, 0.93, 0.95, 0.96]),
        # adam-mini: both seeds reach it at the first val point, 1100 examples
        ("adam", 0, 0.5 * i, [0.975, 0.98, 0.985, 0.99, 0.99]),
        ("adam", 1, 0.6 * i, [0.972, 0.98, 0.985, 0.99, 0.991]),
    ]
    for k, (optimizer, seed, seconds, val_acc) in enumerate(mini, start=1):
        log_mini(client, exp, parent, optimizer, seed, start=t1 + k, seconds=list(seconds), val_acc=val_acc)
    # sgd-full: one update per epoch; seed 0 diverges in the second epoch, seed 1 never reaches 0.97
    full = dict(batch_size=N_TRAIN, train_steps=[3000, 6000], seconds=[0.2, 0.4])
    log_run(
        client,
        exp,
        parent,
        "sgd",
        "full",
        0,
        start=t1 + 6,
        val_steps=[3000],
        val_acc=[0.5],
        train_loss=[2.0, math.nan],
        test=False,
        status="FAILED",
        tags={"diverged": "true", "diverged.examples": "6000", "diverged.updates": "2"},
        **full,
    )
    log_run(client, exp, parent, "sgd", "full", 1, start=t1 + 7, val_steps=[3000, 6000], val_acc=[0.6, 0.7], **full)
    # rmsprop-online: non-finite before its first train log point, as train.py records it: only val points
    online = client.create_run(
        exp,
        start_time=t1 + 8,
        run_name="rmsprop-online-s0",
        tags={
            "mlflow.parentRunId": parent,
            "diverged": "true",
            "diverged.examples": "1200",
            "diverged.updates": "1200",
        },
    )
    params = {
        "optimizer": "rmsprop",
        "batching": "online",
        "model": "mlp",
        "data": "mnist",
        "seed": 0,
        "optimizer.lr": 0.001,
        "data.batch_size": 1,
        "trainer.max_epochs": 2,
    }
    client.log_batch(
        online.info.run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric("val/loss", math.nan, t1 + 9, 1000), Metric("val/acc", 0.092, t1 + 9, 1000)],
    )
    client.set_terminated(online.info.run_id, "FAILED")
    client.set_terminated(parent)

    plain = client.create_experiment("plain", artifact_location=str(root / "mlruns-plain"))
    for k, opt in enumerate(("sgd", "adam")):
        log_mini(client, plain, None, opt, 0, start=t0 + k, seconds=list(0.1 * i), val_acc=OLD_ACC)
    return {"uri": uri, "root": root, "parent": parent, "old": old, "sweep_dir": sweep_dir}


def read_csv(path) -> dict[str, dict]:
    with open(path) as f:
        return {row["configuration"]: row for row in csv.DictReader(f)}


def test_sweep_report_files_numbers_and_artifacts(store):
    paths = report.make_report(store["uri"], parent_run_id=store["parent"])

    # written to the sweep's folder by default
    assert {p.parent for p in paths.values()} == {store["sweep_dir"]}
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000

    rows = read_csv(paths["csv"])
    assert list(rows) == ["sgd-mini", "adam-mini", "sgd-full", "rmsprop-online"]  # the sweep's job order
    assert {k: rows["sgd-mini"][k] for k in ("optimizer", "batching", "seeds", "finished")} == {
        "optimizer": "sgd",
        "batching": "mini",
        "seeds": "3",
        "finished": "3",
    }
    assert "optimizer.lr" not in rows["sgd-mini"]  # follows from optimizer: not a grouping key of its own

    # final metrics: recomputed from the store, over the seeds that finished
    client = MlflowClient(store["uri"])
    children = client.search_runs(
        [client.get_run(store["parent"]).info.experiment_id], f"tags.mlflow.parentRunId = '{store['parent']}'"
    )
    for label, row in rows.items():
        optimizer, batching = label.split("-")
        runs = [
            r
            for r in children
            if r.data.params["optimizer"] == optimizer
            and r.data.params["batching"] == batching
            and r.info.status == "FINISHED"
        ]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
            finals = [client.get_metric_history(r.info.run_id, key)[-1].value for r in runs]
            name = key.replace("/", "_")
            if not finals:  # rmsprop-online: no seed finished
                assert (row[f"{name}_mean"], row[f"{name}_n"]) == ("", "0")
                continue
            assert float(row[f"{name}_mean"]) == pytest.approx(np.mean(finals), abs=1e-12), (label, key)
            assert int(row[f"{name}_n"]) == len(finals)
            if len(finals) > 1:
                assert float(row[f"{name}_std"]) == pytest.approx(np.std(finals, ddof=1), abs=1e-12)
            else:
                assert row[f"{name}_std"] == ""

    # time to val/acc >= 0.97, by hand:
    # sgd-mini s0 first reaches it at 2200 examples: epochs 2200/3000, updates 22 (between 20 at 2000 and
    # 25 at 2500), seconds between 1.36 (i=4) and 1.75 (i=5): 1.36 + 0.4 * 0.39 = 1.516;
    # s1 at 3000, a logged step: epochs 1, updates 30, seconds 0.35 * 6 = 2.1; s2 never
    sgd = rows["sgd-mini"]
    assert sgd["reached"] == "2"
    assert float(sgd["epochs_to_target_mean"]) == pytest.approx((2200 / 3000 + 1) / 2)
    assert float(sgd["updates_to_target_mean"]) == pytest.approx((22 + 30) / 2)
    assert float(sgd["seconds_to_target_mean"]) == pytest.approx((1.516 + 2.1) / 2)
    assert float(sgd["seconds_to_target_std"]) == pytest.approx(np.std([1.516, 2.1], ddof=1))
    # adam-mini: both at 1100 examples, between 1000 and 1500: seconds 1.0 + 0.2 * 0.5 and 1.2 + 0.2 * 0.6
    adam = rows["adam-mini"]
    assert adam["reached"] == "2"
    assert float(adam["epochs_to_target_mean"]) == pytest.approx(1100 / 3000)
    assert float(adam["updates_to_target_mean"]) == pytest.approx(11)
    assert float(adam["seconds_to_target_mean"]) == pytest.approx((1.1 + 1.32) / 2)
    full = rows["sgd-full"]
    assert (full["reached"], full["diverged"], full["finished"], full["epochs_to_target_mean"]) == ("0", "1", "1", "")
    assert (full["diverged_at_examples"], rows["rmsprop-online"]["diverged_at_examples"]) == ("6000", "1200")

    md = paths["md"].read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 3 | ok |" in lines["sgd-mini"] and "(2/3 seeds)" in lines["sgd-mini"]
    assert "0.8667 ± " in lines["sgd-mini"] and "26 ± " in lines["sgd-mini"]
    assert f"{float(sgd['val_acc_mean']):.4f} ± {float(sgd['val_acc_std']):.4f}" in lines["sgd-mini"]
    assert "| 1/2 diverged (at 6000 examples) |" in lines["sgd-full"] and lines["sgd-full"].count("not reached") == 3
    assert "| 1/1 diverged (at 1200 examples) | — | — |" in lines["rmsprop-online"]
    assert "seeds)" not in lines["adam-mini"] and "0.3667" in lines["adam-mini"] and "| 11 " in lines["adam-mini"]
    assert "val acc ≥ 0.97" in md and "![convergence](convergence.png)" in md

    # and the three files are on the parent run, under report/, with the table as an MLflow table
    logged = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert logged == {
        "report/convergence.png",
        "report/convergence.md",
        "report/convergence.csv",
        "report/convergence.json",
    }
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)  # load_table searches runs through the global store
    parent = client.get_run(store["parent"])
    table = client.load_table(parent.info.experiment_id, "report/convergence.json", run_ids=[store["parent"]])
    assert len(table) == len(rows) and set(table["configuration"]) == set(rows)
    report.make_report(client.tracking_uri, store["parent"], out_dir=store["root"] / "again")  # made again:
    table = client.load_table(parent.info.experiment_id, "report/convergence.json", run_ids=[store["parent"]])
    assert len(table) == len(rows)  # replaced, not appended to
    fetched = client.download_artifacts(store["parent"], "report/convergence.png", str(store["root"] / "dl"))
    assert Path(fetched).read_bytes() == png


def test_figure_title_names_the_sweep_not_its_folder(store, tmp_path):
    """The title travels with the figure (docs, a shared report): the sweep's name and run, no folder of the
    machine that drew it; the header of the .md still says where the sweep's folder is."""
    from PIL import Image

    paths = report.make_report(store["uri"], parent_run_id=store["parent"], out_dir=tmp_path)
    title = Image.open(paths["png"]).text["Title"]
    assert title.startswith(f"Sweep sweep (run {store['parent']})"), title
    assert str(store["root"]) not in title and "/" not in title.split(" — ")[0], title
    assert "multiruns" not in title
    assert "multiruns" in paths["md"].read_text().splitlines()[2]


def test_figure_draws_diverged_runs_up_to_where_they_stopped(store):
    from mlflow import MlflowClient

    _, runs = report.select_runs(MlflowClient(store["uri"]), store["parent"])
    by, configs = report.group(runs)
    assert by == ["optimizer", "batching"]
    fig = report.plot(configs, "val")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "sgd-full (1/2 diverged), n=2" in legend and "rmsprop-online (1/1 diverged), n=1" in legend
    assert "sgd-mini, n=3" in legend and any(t.startswith("diverged: at its last finite point") for t in legend)

    def crosses(ax):
        return [tuple(line.get_xydata()[0]) for line in ax.get_lines() if line.get_marker() == "x"]

    # sgd-full s0: in every panel, at its last val point (3000 examples: epoch 1, update 1, 0.2 s)
    assert crosses(fig.axes[0]) == [(1.0, 0.5)] and crosses(fig.axes[5]) == [(0.2, 0.5)]
    # rmsprop-online: no progress/* points; on the updates axis the tags place it: its finite val/acc at
    # 1000 examples = update 1000, and its NaN val/loss as a cross on the top edge at update 1200
    assert crosses(fig.axes[1]) == [(1.0, 0.5), (1200.0, 0.98)]
    assert crosses(fig.axes[4]) == [(1.0, 0.5), (1000.0, 0.092)]
    # updates reach 2 (full batch), 60 (mini), 1200 (online), seconds 0.4 and ~5: log scale; epochs 1-2: linear
    assert [ax.get_xscale() for ax in fig.axes[:3]] == ["linear", "log", "log"]
    assert "(log scale)" in fig.axes[1].get_xlabel() and fig.axes[0].get_ylabel() == "val loss"


def test_experiment_selection_takes_the_latest_sweep(store, tmp_path):
    paths = report.make_report(store["uri"], experiment="descent", out_dir=tmp_path)
    md = paths["md"].read_text()
    assert store["parent"] in md and store["old"] not in md
    assert list(read_csv(paths["csv"])) == ["sgd-mini", "adam-mini", "sgd-full", "rmsprop-online"]


def test_experiment_without_sweep_reports_all_its_runs(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = report.make_report(store["uri"], experiment="plain")
    assert paths["csv"].parent.parent == tmp_path / "outputs" / "reports"  # outputs/reports/<timestamp>/
    rows = read_csv(paths["csv"])
    assert list(rows) == ["sgd-mini", "adam-mini"]
    assert rows["sgd-mini"]["optimizer"] == "sgd" and "batching" not in rows["sgd-mini"]  # only the optimizer varies
    assert rows["sgd-mini"]["reached"] == "1" and float(rows["sgd-mini"]["epochs_to_target_mean"]) == pytest.approx(1.0)
    assert "no sweep found" in paths["md"].read_text()


def test_tracking_uri_defaults_like_train_py(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert resolve_uri(None, tmp_path) == "http://localhost:5000"
    assert resolve_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"


def test_cli(store, tmp_path, capsys):
    # the default store is ./mlflow.db, as for train.py: run from the store's folder without the env var
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "report"
    proc = compare(
        "--parent",
        store["parent"],
        "--out",
        str(out),
        "--target-acc",
        "0.99",
        cwd=store["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out / "convergence.png") in proc.stdout and "| configuration |" in proc.stdout
    assert "val acc ≥ 0.99" in proc.stdout
    assert read_csv(out / "convergence.csv")["adam-mini"]["reached"] == "2"  # 0.99 at 4400 and 4400 examples

    spec = importlib.util.spec_from_file_location("compare", ROOT / "src" / "compare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--tracking-uri", store["uri"], "--experiment", "nope", "--out", str(tmp_path)]) == 2
    assert cli.main(["--tracking-uri", store["uri"], "--parent", "0" * 32, "--out", str(tmp_path)]) == 2
    assert "no run '000" in capsys.readouterr().err

"""A tiny study end to end: parent run, children, the step convention, the report, parallel jobs."""

import csv
from pathlib import Path

import pytest

from conftest import SMALL_STUDY, sweep_of, train

TINY = ["optimizer=sgd", *SMALL_STUDY, "logger.experiment_name=tiny"]


def study(store):
    client, parent, runs = sweep_of(store, "tiny")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def history(client, run, key):
    return client.get_metric_history(run.info.run_id, key)


def check_study(tmp_path, store, launcher_overrides=()):
    train("batching=mini,full", "seed=0,1", *TINY, *launcher_overrides, cwd=tmp_path, store=store, multirun=True)
    client, parent, children = study(store)
    assert parent.info.status == "FINISHED"
    assert "batching=mini,full seed=0,1" in parent.data.params["overrides"]
    assert sorted(r.info.run_name for r in children) == ["sgd-full-s0", "sgd-full-s1", "sgd-mini-s0", "sgd-mini-s1"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"optimizer", "batching", "model", "data", "seed"} <= set(run.data.params)
        full = run.data.params["batching"] == "full"
        # step = training examples seen; progress/* at the same steps as train/loss
        train_steps = [m.step for m in history(client, run, "train/loss")]
        # full batch: one point per update (rarer than log_every); mini: the first update at or after each 500
        expected = [2000, 4000] if full else [512, 1024, 1536, 2000, 2512, 3024, 3536, 4000]
        assert train_steps == expected, run.info.run_name
        for key in ("progress/epoch", "progress/updates", "progress/seconds"):
            assert [m.step for m in history(client, run, key)] == train_steps, key
        updates = [m.value for m in history(client, run, "progress/updates")]
        assert updates == ([1, 2] if full else [4, 8, 12, 16, 20, 24, 28, 32])
        epochs = [m.value for m in history(client, run, "progress/epoch")]
        assert epochs[-1] == 2.0 and epochs == sorted(epochs)
        assert [m.step for m in history(client, run, "val/loss")][-1] == 4000
    # the report, produced by the sweep's callback, matches the runs' metrics
    sweep_dir = Path(parent.data.tags["hydra.sweep.dir"])
    png = sweep_dir / "convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = {row["batching"]: row for row in csv.DictReader(open(sweep_dir / "convergence.csv"))}
    assert set(rows) == {"mini", "full"}
    for batching, row in rows.items():
        finals = [r.data.metrics["val/loss"] for r in children if r.data.params["batching"] == batching]
        assert float(row["val_loss_mean"]) == pytest.approx(sum(finals) / len(finals), rel=1e-6)
        tests = [r.data.metrics["test/acc"] for r in children if r.data.params["batching"] == batching]
        assert float(row["test_acc_mean"]) == pytest.approx(sum(tests) / len(tests), rel=1e-6)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/convergence.png", "report/convergence.md", "report/convergence.csv"} <= logged
    return client, children


@pytest.mark.slow
def test_the_same_study_with_four_parallel_writers_on_one_new_sqlite_store_loses_nothing(tmp_path, mnist_root):
    # its four jobs at once on two cores: they start, find the store brand new (schema, experiment, parent run
    # made once before them), log datasets and metrics, and upload checkpoints side by side
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, children = check_study(
        tmp_path, store, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "logger.log_checkpoint=true"]
    )
    assert len({len(r.data.params) for r in children}) == 1
    for run in children:
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "config.yaml",
            "train_image_4.png",
            "checkpoints",
        }

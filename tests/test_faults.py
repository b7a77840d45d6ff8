"""Faults lose nothing: signals, SIGKILL, divergence, with real subprocesses and real sqlite stores."""

import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import sqlite_store, start, sweep_of, train, wait_for

# long enough to be interrupted mid-epoch: online SGD, 2 epochs of 8000 examples, chunks of 1024
# (a stop request is served at the next chunk boundary)
LONG = [
    "batching=online",
    "optimizer=sgd",
    "data.limit_train=8000",
    "data.chunk_size=1024",
    "trainer.max_epochs=2",
    "trainer.log_every_examples=1000",
    "data.val_size=1000",
    "logger.log_checkpoint=false",
]


def only_run(store):
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    return client, run


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_root):
    """The same run without faults: what a resumed run must reproduce."""
    cwd = tmp_path_factory.mktemp("reference")
    store = sqlite_store(cwd)
    train(*LONG, cwd=cwd, store=store)
    client, run = only_run(store)
    return {k: steps(client, run.info.run_id, k) for k in ("train/loss", "val/loss")} | {"metrics": run.data.metrics}


# Ctrl-C from outside, wherever it lands (tests/test_resume.py stops runs with SIGTERM and SIGINT at chosen
# boundaries; test_cluster.py's SLURM job is stopped by SIGTERM from outside)
@pytest.mark.parametrize("signum", [signal.SIGINT], ids=["SIGINT"])
def test_signal_saves_a_checkpoint_marks_killed_and_resume_continues_the_same_run(
    tmp_path, store, signum, uninterrupted
):
    proc = start(tmp_path, store, *LONG)
    wait_for(proc, "first update")  # training has begun: the stop is served at the next chunk boundary
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit 120 s after {signum!r}:\n{proc.communicate()[0][-3000:]}") from None
    assert time.monotonic() - sent < 60, "the process must exit promptly"  # generous: CI machines are noisy
    assert proc.returncode == 128 + signum
    client, run = only_run(store)
    assert run.info.status == "KILLED"
    assert f"resume={run.info.run_id}" in out
    assert (tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt").exists()
    stopped_at = run.data.metrics["progress/epoch"]
    assert 0 < stopped_at < 2, "interrupted mid-run"

    # by run id: the run's recorded output folder holds the checkpoint (resume by folder: the next test)
    train(f"resume={run.info.run_id}", cwd=tmp_path, store=store)
    client, resumed = only_run(store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    # metric steps continue with no gap and no duplicate: exactly the uninterrupted run's steps
    assert steps(client, run.info.run_id, "train/loss") == uninterrupted["train/loss"]
    assert steps(client, run.info.run_id, "val/loss") == uninterrupted["val/loss"]
    # the same data order and updates: the same final model
    for key in ("test/loss", "test/acc", "progress/updates", "progress/epoch"):
        assert resumed.data.metrics[key] == pytest.approx(uninterrupted["metrics"][key], rel=1e-5), key


def test_sigkill_resumes_from_the_last_periodic_checkpoint(tmp_path, store, uninterrupted):
    proc = start(tmp_path, store, *LONG, "trainer.checkpoint_every_seconds=1")
    wait_for(proc, "first update")
    ckpt = tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline:  # a file has no event to wait on: poll it
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    state = torch.load(ckpt, weights_only=True)["descent"]
    # a periodic checkpoint: taken inside an epoch (the first epoch end is 8000 examples in)
    assert not state["epoch_closed"] and 0 < state["examples"] < 8000, state
    client, run = only_run(store)
    assert run.info.status == "RUNNING"  # nobody could mark it: resume corrects it
    assert run.data.metrics.get("progress/epoch", 0) < 1

    train(f"resume={tmp_path / 'outputs' / 'run'}", cwd=tmp_path, store=store)  # by output folder this time
    client, resumed = only_run(store)
    assert resumed.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == uninterrupted["train/loss"]
    assert resumed.data.metrics["test/loss"] == pytest.approx(uninterrupted["metrics"]["test/loss"], rel=1e-5)


def test_resume_of_something_unknown_is_a_clear_error(tmp_path, store, mnist_root):
    proc = train("resume=0123456789abcdef", cwd=tmp_path, store=store, check=False)
    assert proc.returncode != 0
    assert "resume='0123456789abcdef': neither a run folder nor a run id" in proc.stderr + proc.stdout


def test_divergence_stops_the_run_and_marks_it_failed(tmp_path, store, mnist_root):
    proc = train(
        "optimizer=sgd",
        "optimizer.lr=1e20",
        "data.limit_train=4000",
        "trainer.max_epochs=3",
        cwd=tmp_path,
        store=store,
        check=False,
    )
    assert proc.returncode == 3
    out = proc.stdout + proc.stderr
    assert "diverged: train/loss became nan" in out or "diverged: train/loss became inf" in out
    assert "Traceback" not in out
    client, run = only_run(store)
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["diverged"] == "true" and int(tags["diverged.examples"]) <= 1200 + 128
    assert int(tags["diverged.updates"]) >= 1
    assert "test/acc" not in run.data.metrics


def test_a_diverged_job_does_not_stop_the_sweep(tmp_path, store, mnist_root):
    train(
        "optimizer=sgd",
        "optimizer.lr=1e20,0.01",
        "data.limit_train=2000",
        "trainer.max_epochs=1",
        "logger.log_checkpoint=false",
        cwd=tmp_path,
        store=store,
        multirun=True,
    )
    _, parent, runs = sweep_of(store)
    children = {r.data.params["optimizer.lr"]: r for r in runs if r is not parent}
    assert children["1e+20"].info.status == "FAILED" and children["1e+20"].data.tags["diverged"] == "true"
    assert children["0.01"].info.status == "FINISHED" and "test/acc" in children["0.01"].data.metrics
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())


@pytest.mark.parametrize(
    "uri,message",
    [
        ("sqlite:////nonexistent/folder/mlflow.db", "the folder /nonexistent/folder does not exist"),
        ("http://127.0.0.1:9", "the MLflow server does not answer"),
    ],
)
def test_an_unusable_tracking_store_is_reported_before_training(tmp_path, mnist_root, uri, message):
    proc = train("data.limit_train=1000", cwd=tmp_path, store=uri, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert f"logger.tracking_uri={uri!r}: {message}" in out
    assert "first update" not in out and "Traceback" not in out

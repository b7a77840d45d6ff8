"""The team tracking server (descent.services.server): real PostgreSQL, real `mlflow server`, real train.py runs.

An Optuna study with parallel trials in the server's PostgreSQL, resume on "another machine" (another folder,
no local outputs), and the server going away in the middle of a run: for a few seconds (survived) and for good
(stopped, resumable).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient

from conftest import compare, start, sweep_of, train, wait_for
from descent.services import server
from descent.tracking.store import reachable

# 3 epochs of 100 batches of 128, a checkpoint every second (each one writes the metric points and
# uploads the checkpoint); stop requests are served every 1280 examples
LONG = [
    "optimizer=sgd",
    "data.limit_train=12800",
    "data.chunk_size=1280",
    "trainer.max_epochs=3",
    "trainer.log_every_examples=1280",
    "data.val_size=1000",
    "trainer.checkpoint_every_seconds=1",
]


OUTAGE = [*LONG, "trainer.max_epochs=8"]  # long enough that the outage begins and ends while it trains


def finish(proc, timeout=300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def run_of(client, experiment, timeout=120, until=lambda run: True):
    """The experiment's only run, once `until` holds for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if len(runs) == 1 and until(runs[0]):
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no run in {experiment!r} reached the expected state in {timeout} s")


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def has_checkpoint(client, run):
    return any(a.path == "checkpoints/last.ckpt" for a in client.list_artifacts(run.info.run_id, "checkpoints"))


def assert_complete(client, run_id, epochs=3):
    """Every metric point exactly once, at the steps an uninterrupted run logs."""
    assert client.get_run(run_id).info.status == "FINISHED"
    train_steps = steps(client, run_id, "train/loss")
    assert train_steps == list(range(1280, 12800 * epochs + 1, 1280))  # train/loss every 10 batches
    for key in ("train/acc", "progress/epoch", "progress/updates", "progress/seconds"):
        assert steps(client, run_id, key) == train_steps, key
    assert steps(client, run_id, "val/loss") == list(range(12800, 12800 * epochs + 1, 12800))  # epoch ends
    assert steps(client, run_id, "test/acc") == [12800 * epochs]


def noticed_in_training(lines: list[str]) -> None:
    """The run met the outage while it trained (a metric write or an upload missed), not at its end."""
    [line] = [line for line in lines if "does not answer" in line]
    assert "(waiting to end the run)" not in line and "giving up" not in line, line


def kill_mlflow(dir: Path) -> None:
    """The MLflow server dies (PostgreSQL stays): SIGKILL to its whole process group."""
    pid = server.mlflow_pid(dir)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while reachable(server.tracking_uri(server._state(dir)["port"]), timeout=0.5):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def restart(dir: Path, uri: str) -> None:
    assert server.start(dir) == uri


def test_start_is_idempotent_and_reports_the_uri(tracking_server, tracking_server_dir):
    out = subprocess.run(
        [sys.executable, "-m", "descent.services.server", "start", "--dir", str(tracking_server_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "already running" in out and f"export MLFLOW_TRACKING_URI={tracking_server}" in out
    status = subprocess.run(
        [sys.executable, "-m", "descent.services.server", "status", "--dir", str(tracking_server_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "postgresql: running" in status.stdout
    assert server.backend_uri(tracking_server_dir).startswith("postgresql+psycopg2://")


def test_a_parallel_study_in_the_servers_postgresql_nests_its_trials_under_one_parent_with_the_report(
    tmp_path, tracking_server, tracking_server_dir, mnist_root
):
    # an Optuna study as a team runs it: trials two at a time (joblib), the study in the server's PostgreSQL
    storage = server.study_storage(tracking_server_dir)
    train(
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweeper.storage='{storage}'",  # quoted for Hydra: the URL holds = and &
        "optimizer.lr=tag(log,interval(0.01,0.5))",
        "optimizer=sgd",
        "data.limit_train=2000",
        "data.val_size=1000",
        "trainer.max_epochs=2",
        "trainer.log_every_examples=500",
        "logger.experiment_name=server_sweep",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        cwd=tmp_path,
        store=tracking_server,
        multirun=True,
    )
    client, parent, runs = sweep_of(tracking_server, "server_sweep")
    children = {
        int(r.data.tags["optuna.trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.storage"] == storage
    assert not (tmp_path / "outputs" / "sweep" / "mlflow_parent_run_id").exists()  # found through the store
    assert not (tmp_path / "optuna.db").exists()
    study = optuna.load_study(study_name="server_sweep", storage=storage)
    assert sorted(children) == [t.number for t in study.trials] == [0, 1]
    for number, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert steps(client, run.info.run_id, "train/loss") == [512, 1024, 1536, 2000, 2512, 3024, 3536, 4000]
        assert study.trials[number].value == client.get_metric_history(run.info.run_id, "val/loss")[-1].value
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "train_image_4.png", "checkpoints"} <= artifacts
        assert has_checkpoint(client, run)
    assert parent.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/convergence.png", "report/convergence.csv", "report/search.png", "report/search.md"} <= report
    # the report tool reads the server too
    out = compare(
        "--tracking-uri",
        tracking_server,
        "--parent",
        parent.info.run_id,
        "--out",
        str(tmp_path / "report"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report" / "convergence.csv").is_file() and (tmp_path / "report" / "search.md").is_file()


def test_a_killed_run_resumes_in_another_folder_from_the_artifact_checkpoint(tmp_path, tracking_server, mnist_root):
    client = MlflowClient(tracking_server)
    first, elsewhere = tmp_path / "machine1", tmp_path / "machine2"
    first.mkdir(), elsewhere.mkdir()
    proc = start(first, tracking_server, *OUTAGE, "logger.experiment_name=server_resume")  # long enough to kill
    try:  # SIGKILL once a periodic checkpoint (not the final one) has reached the artifact store
        run = run_of(
            client, "server_resume", until=lambda r: "train/loss" in r.data.metrics and has_checkpoint(client, r)
        )
        proc.kill()
    finally:
        out = finish(proc)
    assert proc.returncode == -signal.SIGKILL, out
    assert len(steps(client, run.info.run_id, "train/loss")) < 8 * 10, "killed while training"
    shutil.rmtree(first)  # nothing of the first machine is left
    train(f"resume={run.info.run_id}", cwd=elsewhere, store=tracking_server)
    assert (elsewhere / "outputs" / "run" / "checkpoints" / "last.ckpt").is_file()
    assert_complete(client, run.info.run_id, epochs=8)
    assert client.get_run(run.info.run_id).data.tags["hydra.output_dir"] == str(elsewhere / "outputs" / "run")


def test_the_server_away_for_seconds_mid_run_loses_no_point(tmp_path, tracking_server, tracking_server_dir, mnist_root):
    client = MlflowClient(tracking_server)
    proc = start(tmp_path, tracking_server, *OUTAGE, "logger.experiment_name=server_outage")
    try:
        run = run_of(client, "server_outage", until=lambda r: "train/loss" in r.data.metrics)
        kill_mlflow(tracking_server_dir)
        lines = wait_for(proc, "does not answer")
        assert proc.poll() is None  # training goes on without the server
        restart(tracking_server_dir, tracking_server)
    finally:
        out = finish(proc)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-4000:]
    noticed_in_training(out.splitlines())
    assert "is back" in out, out[-4000:]
    assert_complete(client, run.info.run_id, epochs=8)


def test_the_server_away_past_the_bound_stops_the_run_which_resumes_here(
    tmp_path, tracking_server, tracking_server_dir, mnist_root
):
    client = MlflowClient(tracking_server)
    # online SGD: 3 epochs of 12800 updates, ~3 s each on a quiet machine here, so the bound (1 s, seen at the
    # next probe 2 s on) passes while it trains
    proc = start(
        tmp_path,
        tracking_server,
        *LONG,
        "batching=online",
        "logger.outage_seconds=1",
        "logger.experiment_name=server_gone",
    )
    try:
        run = run_of(client, "server_gone", until=lambda r: "train/loss" in r.data.metrics)
        kill_mlflow(tracking_server_dir)
        out = finish(proc, timeout=300)
    finally:
        restart(tracking_server_dir, tracking_server)
    assert proc.returncode == 75, out[-4000:]
    assert f"resume={run.info.run_id}" in out and "Nothing is lost" in out, out[-4000:]
    noticed_in_training(out.splitlines())
    # the points the server did not get are in the checkpoint it stopped with (not lost, not a side file)
    carried = int(re.search(r"with the (\d+) metric points it did not get", out).group(1))
    checkpoint = torch.load(tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["descent"]
    assert carried > 0 and len(checkpoint["points"]) >= carried
    assert checkpoint["examples"] < 3 * 12800, "stopped while training"
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # the server was not there to be told
    # same machine: the local checkpoint; the points it carries are written first
    proc = train(f"resume={run.info.run_id}", cwd=tmp_path, store=tracking_server)
    assert "metric points of the checkpoint were not in the store yet" in proc.stdout + proc.stderr
    assert_complete(client, run.info.run_id)


def test_data_survive_a_stop_and_start(tracking_server, tracking_server_dir):
    client = MlflowClient(tracking_server)
    survivor = client.create_run(client.create_experiment("survive_a_restart")).info.run_id
    client.log_metric(survivor, "train/loss", 0.5, step=128)
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = {r.info.run_id for r in client.search_runs(experiments)}
    assert survivor in before
    server.stop(tracking_server_dir)
    assert server.status(tracking_server_dir) == {
        "postgresql": "stopped",
        "mlflow": "stopped",
        "uri": None,
        "healthy": False,
        "studies": None,
    }
    assert server.start(tracking_server_dir) == tracking_server
    assert server.status(tracking_server_dir)["studies"] == server.study_storage(tracking_server_dir)
    assert {r.info.run_id for r in client.search_runs(experiments)} == before
    assert [(m.step, m.value) for m in client.get_metric_history(survivor, "train/loss")] == [(128, 0.5)]

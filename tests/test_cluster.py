"""The same small study on real single-node clusters: Ray (hydra/launcher=ray) and SLURM (hydra/launcher=slurm).

Both clusters are started by descent.services (ray_cluster.Ray, slurm_cluster.Slurm), as `make ray` / `make slurm`
start them, on free loopback ports with their state under pytest's temp folder, and stopped at the end whatever
happens. The jobs log to the real tracking server (PostgreSQL + MLflow, `tracking_server`) over http, as jobs on
other nodes would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import SMALL_STUDY, sweep_of, train
from descent.services.daemons import free_port, read_state
from descent.services.ray_cluster import Ray
from descent.services.slurm_cluster import Slurm

STUDY = [
    "experiment=gd_vs_sgd",
    "batching=full,mini",
    "seed=0",
    *SMALL_STUDY,
    "logger.system_metrics=false",
]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = Ray(tmp_path_factory.mktemp("ray"), port=free_port())
    try:
        ray.start()
        yield ray
    finally:
        ray.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM runs its daemons as root")
    slurm = Slurm(tmp_path_factory.mktemp("slurm"), free_port(), free_port())
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def sweep_runs(uri: str, experiment: str):
    """(client, the one sweep parent, the experiment's other runs)."""
    client, parent, runs = sweep_of(uri, experiment)
    return client, parent, [r for r in runs if r is not parent]


def check_study(uri: str, experiment: str, tmp_path: Path) -> None:
    client, parent, children = sweep_runs(uri, experiment)
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["sgd-full-s0", "sgd-mini-s0"]
    for run in children:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["batching"] in ("full", "mini") and run.data.metrics["test/acc"] > 0.5
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == 4000
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/convergence.png", "report/convergence.md", "report/convergence.csv"} <= logged
    # on one machine the sweep folder is shared: each job's outputs are where the driver looks
    assert {p.name for p in (tmp_path / "outputs" / "sweep").iterdir()} >= {"0", "1", "convergence.md"}


def test_a_study_on_ray(tmp_path, tracking_server, ray_cluster, mnist_root):
    # RAY_ADDRESS only, as a user who did not export the loopback mode `make ray` prints: the launcher
    # config's callback (descent.services.ray_cluster.RayLoopback) sets it in the driver
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    train(
        *STUDY,
        "hydra/launcher=ray",
        "logger.experiment_name=on-ray",
        cwd=tmp_path,
        store=tracking_server,
        multirun=True,
        env={"RAY_ADDRESS": ray_cluster.address},
        timeout=600,
    )
    check_study(tracking_server, "on-ray", tmp_path)


def test_the_ray_cluster_listens_on_loopback_only(ray_cluster):
    import psutil

    pids = read_state(ray_cluster.dir)["pids"].values()
    procs = [p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
    listening = {
        (c.laddr.ip, c.laddr.port, p.name())
        for p in procs
        for c in p.net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert any(port == ray_cluster.port for _, port, _ in listening), listening  # the GCS
    assert {ip for ip, _, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_a_ray_sweep_without_a_cluster_stops_at_once_saying_how_to_start_one(tmp_path, store):
    address = f"127.0.0.1:{free_port()}"
    tic = time.monotonic()
    proc = train(
        "optimizer=sgd,adam",
        "hydra/launcher=ray",
        cwd=tmp_path,
        store=store,
        multirun=True,
        check=False,
        env={"RAY_ADDRESS": address},
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"no Ray cluster answers at {address}" in out and "make ray" in out
    assert "Traceback" not in out and time.monotonic() - tic < 60
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()]
    ), "no parent run"


def test_a_study_on_slurm(tmp_path, tracking_server, slurm_cluster, mnist_root):
    train(
        *STUDY,
        "hydra/launcher=slurm",
        "logger.experiment_name=on-slurm",
        cwd=tmp_path,
        store=tracking_server,
        multirun=True,
        env=slurm_cluster.env(),
        timeout=600,
    )
    check_study(tracking_server, "on-slurm", tmp_path)
    # every job went through SLURM: submitit keeps each one's sbatch script and logs, named by job id
    assert len(list((tmp_path / "outputs" / "sweep" / ".submitit").glob("*/*_log.out"))) == 2


def test_a_job_killed_on_slurm_ends_failed_not_running(tmp_path, tracking_server, slurm_cluster, mnist_root):
    """SIGKILL (what the out-of-memory killer or a lost node amounts to) leaves the job no word to say:
    its sweep records it FAILED when the launcher gives up on it."""
    import threading

    import psutil

    done = {}
    driver = threading.Thread(
        target=lambda: done.update(
            proc=train(
                "seed=0",
                "optimizer=sgd",
                "data.limit_train=2000",
                "trainer.max_epochs=1000",
                "logger.log_checkpoint=false",
                "logger.system_metrics=false",
                "logger.experiment_name=killed",
                "hydra/launcher=slurm",
                cwd=tmp_path,
                store=tracking_server,
                multirun=True,
                check=False,
                env=slurm_cluster.env(),
                timeout=600,
            )
        )
    )
    driver.start()
    deadline = time.monotonic() + 300
    job = None
    while job is None and time.monotonic() < deadline and driver.is_alive():
        time.sleep(1)
        client = MlflowClient(tracking_server)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments(filter_string="name = 'killed'")])
        if any(r.info.status == "RUNNING" and "descent.sweep" not in r.data.tags for r in runs):
            # the job's own process, as SLURM started it: submitit's runner on this test's sweep folder
            # (a process that ends as it is listed, a zombie, shows cmdline None)
            job = next(
                (
                    p
                    for p in psutil.process_iter(["cmdline"])
                    if "submitit.core._submit" in (p.info["cmdline"] or [])
                    and any(str(tmp_path) in arg for arg in p.info["cmdline"])
                ),
                None,
            )
    assert job is not None, "the job never ran"
    job.send_signal(signal.SIGKILL)
    driver.join(timeout=400)
    assert not driver.is_alive() and done["proc"].returncode != 0
    client, parent, [child] = sweep_runs(tracking_server, "killed")
    assert child.info.status == "FAILED" and child.data.tags["descent.ended_by"] == "sweep"
    assert parent.info.status == "KILLED"

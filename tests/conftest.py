"""Shared fixtures: the real MNIST cache, the real entry point in a subprocess, a real sqlite store,
a real tracking server (PostgreSQL + MLflow)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the project's own cache, built from the offline bundle on first use


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    from descent.data import ensure_mnist

    ensure_mnist(DATA, download=False)
    return DATA


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tracking_server_dir():
    """State folder of the session's tracking server; under /tmp, where PostgreSQL's own user can reach it
    (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="descent-tracking-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(tracking_server_dir) -> str:
    """A real PostgreSQL + MLflow tracking server, started as `make server` does (descent.server), on a
    free loopback port; yields its http URI and stops both processes at the end of the session."""
    from descent import server

    try:
        yield server.start(tracking_server_dir, free_port())
    finally:
        server.stop(tracking_server_dir)


def train(*overrides: str, cwd: Path, store: str, multirun: bool = False, check: bool = True,
          timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run src/train.py as a user would, on the real data cache, writing outputs under cwd."""
    args = [sys.executable, str(ROOT / "src" / "train.py")]
    if multirun:
        args.append("-m")
    args += [
        f"data.root={DATA}",
        "trainer.progress_bar=false",
        "logger.log_model=false",  # 3-4 s per process; tests/test_record.py and test_ui.py switch it on
        f"hydra.run.dir={cwd}/outputs/run",
        f"hydra.sweep.dir={cwd}/outputs/sweep",
        *overrides,
    ]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": store, **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, mnist_root):
    """A 2-job sweep (sgd, rmsprop) with validation data, the progress bar on and models registered, in
    its own sqlite store: tests/test_record.py reads its record, tests/test_ui.py shows it in a browser.
    Returns (launch dir, store URI, train.py's output)."""
    tmp = tmp_path_factory.mktemp("small_sweep")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = train("optimizer=sgd,rmsprop", "data.limit_train=2000", "data.val_size=1000", "trainer.max_epochs=1",
                 "trainer.val_every_examples=500", "trainer.progress_bar=true", "logger.log_model=true",
                 "logger.register_model=mnist-mlp", cwd=tmp, store=store, multirun=True,
                 env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    return tmp, store, proc.stdout + proc.stderr

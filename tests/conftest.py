"""Shared fixtures: the real MNIST cache, the real entry point in a subprocess, a real sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
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


def train(*overrides: str, cwd: Path, store: str, multirun: bool = False, check: bool = True,
          timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run src/train.py as a user would, on the real data cache, writing outputs under cwd."""
    args = [sys.executable, str(ROOT / "src" / "train.py")]
    if multirun:
        args.append("-m")
    args += [
        f"data.root={DATA}",
        "trainer.progress_bar=false",
        f"hydra.run.dir={cwd}/outputs/run",
        f"hydra.sweep.dir={cwd}/outputs/sweep",
        *overrides,
    ]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": store, **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc

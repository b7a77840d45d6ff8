"""`mlflow ui` on the project's store: what `make ui` runs, and what the browser test starts.

    python -m descent.services.ui [--port 5000]      # in the launch directory; Ctrl-C stops it

The store is $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here (the default of src/train.py). A
tracking server (http://...) already serves the UI: then this only says where. One uvicorn worker and
no job-execution workers (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): MLflow's defaults (4 workers plus
the job workers) took 26 s and 2.8 GB to start on a 2-core machine, for a UI one person reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from descent.services.daemons import kill_group
from descent.tracking.store import DEFAULT_URI, reachable

HOST = "127.0.0.1"  # loopback only


# MLflow 3's UI opens every experiment on its GenAI pages unless the browser chose "Model training" before
# (its toggle, kept in the browser's local storage) or the link says so: descent's links say so
VIEW = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table in the MLflow UI at `base` (http://host:port)."""
    return f"{base}/#/experiments/{experiment_id}?{VIEW}"


def experiment_links(uri: str, base: str) -> list[str]:
    """One line per active experiment of the store: its name and its runs table's link."""
    # mlflow: seconds of start-up (4.7 s measured on a busy 2-core machine), paid here by `make ui` alone
    # (console/terminal.py imports this module for its default store and host only)
    from mlflow import MlflowClient

    try:
        found = MlflowClient(uri).search_experiments(order_by=["last_update_time DESC"])
    except Exception as e:  # the UI still starts; it says what is wrong with the store itself
        return [f"(could not list the experiments of {uri}: {type(e).__name__})"]
    return [f"  {e.name}: {experiment_url(base, e.experiment_id)}" for e in found if e.name != "Default"]


def store_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def command(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow, "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port), "--workers", "1"]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start(uri: str, port: int, cwd: str | Path, log: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start it in the background (its own process group) and wait until it answers; returns (process, url)."""
    argv, env = command(uri, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while not reachable(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"mlflow ui did not start on {url} (see {log}):\n" + Path(log).read_text()[-2000:])
        time.sleep(0.5)
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to its process group (uvicorn and its worker), SIGKILL if it lingers."""
    if proc.poll() is None:
        kill_group(proc.pid, timeout)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Open the MLflow UI on descent's runs (make ui).")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    uri = store_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI={uri} is a tracking server: it serves the UI, open {uri}")
        return 0
    argv, env = command(uri, args.port)
    base = f"http://{HOST}:{args.port}"
    print(f"MLflow UI on {uri}: {base} (Ctrl-C stops it); each experiment's runs table:", flush=True)
    print("\n".join(experiment_links(uri, base) or ["  (no runs yet: python src/train.py)"]), flush=True)
    os.execve(argv[0], argv, env)  # the UI in the foreground, as `mlflow ui` would be


if __name__ == "__main__":
    sys.exit(main())

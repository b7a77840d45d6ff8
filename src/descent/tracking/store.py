"""The MLflow tracking store: where it is, whether it answers, and the lookups runs and sweeps make in it.

No torch or lightning import here (the reports and the sweep's driver use it in a second of start-up).
Jobs on other machines share no filesystem with the driver: whatever they need (the sweep's parent
run, a checkpoint to resume) they find through the store.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from descent.config import ConfigError
from descent.tracking import names

DEFAULT_URI = "sqlite:///mlflow.db"
CHECKPOINT = "checkpoints/last.ckpt"  # in a run's output folder and in its artifacts alike
# the config groups whose chosen option becomes a param of its own, for "group by" in the UI
GROUPS = ("data", "model", "optimizer", "batching")


def tracking_uri(uri: str, launch_dir: str | Path) -> str:
    """A relative sqlite path is relative to the launch directory, where `mlflow ui` opens it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(launch_dir) / uri[len(prefix) :]).resolve())
    return uri


def resolve_uri(uri: str | None = None, launch_dir: str | Path | None = None) -> str:
    """An explicit URI, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the launch directory."""
    return tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI, launch_dir or os.getcwd())


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def health(uri: str, timeout: float = 2) -> None:
    """A tracking server's /health, the one probe of descent's servers (the team's, `make ui`'s); raises OSError
    (urllib's URLError, HTTPError) when it does not answer OK."""
    urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()


def reachable(uri: str, timeout: float = 2) -> bool:
    """A quick look at a server's /health (MLflow's own client retries for minutes before it gives up)."""
    if not is_server(uri):
        return True
    try:
        health(uri, timeout)
        return True
    except (urllib.error.URLError, OSError):
        return False


def check_store(uri: str) -> None:
    """Fail before training, with a clear message, when the tracking store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        target = path if path.exists() else path.parent
        if not target.exists():
            raise ConfigError(f"logger.tracking_uri={uri!r}: the folder {path.parent} does not exist")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {target} is not writable")
    elif is_server(uri):
        try:
            health(uri, timeout=5)
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(
                f"logger.tracking_uri={uri!r}: the MLflow server does not answer ({e}); start one with `make server`"
            ) from None


def retry(fn, *args, attempts: int = 8, races: tuple[str, ...] = (), **kwargs):
    """sqlite lets one writer in at a time: parallel jobs back off and retry "database is locked", and the
    errors named in `races` (a row another job created first: the retry finds it)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            transient = "locked" in str(e).lower() or any(r in str(e) for r in races)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def experiment_id(client, name: str) -> str:
    """The experiment's id, created when new; tagged as a model-training experiment (names.KIND) when it has no
    kind yet, so `mlflow ui` opens it on its runs table (MLflow 3.x reads it to choose its view: the runs table, not the
    GenAI pages). A kind a user chose in the UI is kept."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active":
        if names.KIND not in exp.tags:  # made before descent tagged its experiments: tagged on its next run
            retry(client.set_experiment_tag, exp.experiment_id, names.KIND, names.KIND_VALUE)
        return exp.experiment_id
    if exp is not None:
        raise RuntimeError(
            f"logger.experiment_name={name!r} names a deleted MLflow experiment; "
            "restore it (mlflow experiments restore) or choose another name"
        )
    try:
        return client.create_experiment(name, tags={names.KIND: names.KIND_VALUE})
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_parent(client, experiment_name: str, sweep_key: str) -> str | None:
    """The running sweep's parent run, looked up by the sweep key its callback tagged it with.

    The key is the sweep folder as configured (hydra.sweep.dir): every job of a sweep is handed the
    same string, wherever it runs. Two sweeps into one folder: the one running, the latest started.
    """
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return None
    key = sweep_key.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{names.SWEEP_KEY}` = '{key}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_resume(target: str, uri: str, out_dir: str | Path, check=None):
    """resume= an output folder or an MLflow run id -> (run id, output folder, config, group choices).

    The config and choices come from the MLflow run itself (config.yaml and params), the record of
    what actually ran. The checkpoint is the run's own output folder's when this machine has it,
    else the one in the run's artifacts, downloaded into out_dir (the new run folder): a run killed
    on one machine continues on another.

    check(config, choices, run id, status), when given, sees the record before the checkpoint is looked
    for: it may refuse (ConfigError); what it returns takes the config's place in the result.
    """
    import tempfile

    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    client = MlflowClient(uri)
    path = Path(target)
    if path.is_dir():
        id_file = path / "mlflow_run_id"
        if not id_file.is_file():
            raise ConfigError(
                f"resume={target!r}: {path.resolve()} is not a descent run folder (no mlflow_run_id file)"
            )
        target = id_file.read_text().strip()
    try:
        run = client.get_run(target)
    except Exception:
        raise ConfigError(f"resume={str(path)!r}: neither a run folder nor a run id in {uri}") from None
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        config = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    choices = {g: run.data.params[g] for g in GROUPS if g in run.data.params}
    if check is not None:
        config = check(config, choices, run_id, run.info.status)
    local = Path(run.data.tags.get(names.OUTPUT_DIR, ""))
    if path.is_dir() or (local / CHECKPOINT).is_file():
        out = path if path.is_dir() else local
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(f"resume={str(path)!r}: no checkpoint at {out / CHECKPOINT}")
    else:
        out = Path(out_dir)
        try:
            (out / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(run_id, CHECKPOINT, str((out / CHECKPOINT).parent))  # the file lands there
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"resume={str(path)!r}: no checkpoint in {local} on this machine, nor in the run's artifacts ({why})"
            ) from None
    return run_id, out, config, choices


def log_table(client, run_id: str, data, artifact_file: str) -> None:
    """MLflow's log_table, replacing a table of that name (MLflow's appends to it: a report made again, or a
    run extended and tested again, would show its rows twice)."""
    import posixpath

    folder = posixpath.dirname(artifact_file) or None
    if any(f.path == artifact_file for f in client.list_artifacts(run_id, folder)):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(
            client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri
        ).delete_artifacts(artifact_file)
    client.log_table(run_id, data, artifact_file)

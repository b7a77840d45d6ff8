"""MLflow: where runs go, what they record, and metric writes batched off the hot path."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

from descent.config import ConfigError

# the config groups whose chosen option becomes a param of its own, for "group by" in the UI
GROUPS = ("data", "model", "optimizer", "batching")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def tracking_uri(uri: str, launch_dir: str | Path) -> str:
    """A relative sqlite path is relative to the launch directory, where `mlflow ui` opens it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(launch_dir) / uri[len(prefix):]).resolve())
    return uri


def check_store(uri: str) -> None:
    """Fail before training, with a clear message, when the tracking store cannot be reached or written."""
    import urllib.error
    import urllib.request

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        target = path if path.exists() else path.parent
        if not target.exists():
            raise ConfigError(f"logger.tracking_uri={uri!r}: the folder {path.parent} does not exist")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {target} is not writable")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"logger.tracking_uri={uri!r}: the MLflow server does not answer ({e})") from None


def flatten(cfg: DictConfig) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def retry(fn, *args, attempts: int = 8, **kwargs):
    """sqlite lets one writer in at a time: parallel jobs back off and retry "database is locked"."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active":
        return exp.experiment_id
    if exp is not None:
        raise RuntimeError(f"logger.experiment_name={name!r} names a deleted MLflow experiment; "
                           "restore it (mlflow experiments restore) or choose another name")
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Logger(MLFlowLogger):
    """Lightning's MLflow logger, with metric points buffered and written in a few log_batch calls.

    One synchronous DB write per log point would cost more than an epoch of the seed run. Points
    are written when a checkpoint is saved (save(), called by the module; periodic and at epoch
    ends), at the end, and on a crash: what the store holds is always what a checkpoint can resume.
    The run's final status is set by train.py (FINISHED, FAILED or KILLED), not by lightning.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list = []

    def log_metrics(self, metrics, step=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items())

    def flush(self) -> None:
        while self.pending:  # what was written leaves the buffer; a failure keeps the rest
            retry(self.experiment.log_batch, self.run_id, metrics=self.pending[:MAX_BATCH])
            del self.pending[:MAX_BATCH]

    def save(self) -> None:
        pass  # lightning calls this after every training batch; we flush with checkpoints instead

    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        self.flush()
        if status != "success":  # a crash inside lightning: record it now, the process may not get further
            retry(self.experiment.set_terminated, self.run_id, "FAILED")

    def end(self, status: str) -> None:
        if self._initialized:
            self.flush()
            retry(self.experiment.set_terminated, self.run_id, status)


def find_resume(target: str, uri: str):
    """resume= an output folder or an MLflow run id -> (run id, output folder, config, group choices).

    The config and choices come from the MLflow run itself (config.yaml and params), the record of
    what actually ran.
    """
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    path = Path(target)
    if path.is_dir():
        id_file = path / "mlflow_run_id"
        if not id_file.is_file():
            raise ConfigError(f"resume={target!r}: {path.resolve()} is not a descent run folder (no mlflow_run_id file)")
        target = id_file.read_text().strip()
    try:
        run = client.get_run(target)
    except Exception:
        raise ConfigError(f"resume={str(path)!r}: neither a run folder nor a run id in {uri}") from None
    out = Path(run.data.tags.get("hydra.output_dir", ""))
    if not (out / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"resume={str(path)!r}: no checkpoint at {out / 'checkpoints' / 'last.ckpt'}")
    with tempfile.TemporaryDirectory() as tmp:
        config = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", tmp))
    choices = {g: run.data.params[g] for g in GROUPS if g in run.data.params}
    return run.info.run_id, out, config, choices


def run_name(choices: dict[str, str], seed: int) -> str:
    return f"{choices.get('optimizer', 'opt')}-{choices.get('batching', 'batch')}-s{seed}"


def make_logger(cfg: DictConfig, choices: dict[str, str], launch_dir: str, tags: dict[str, str],
                run_id: str | None = None) -> Logger:
    """A new run, or (run_id given) the run being resumed."""
    tags = {k: v for k, v in tags.items() if v is not None}
    commit = git_commit(launch_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    logger = Logger(
        experiment_name=cfg.logger.experiment_name,
        run_name=run_name(choices, cfg.seed),
        tracking_uri=tracking_uri(cfg.logger.tracking_uri, launch_dir),
        tags=tags,
        run_id=run_id,
    )
    if run_id is None:
        from mlflow import MlflowClient

        # the experiment exists before lightning looks it up (parallel jobs race to create it)
        logger._experiment_id = experiment_id(MlflowClient(logger._tracking_uri), cfg.logger.experiment_name)
    else:
        for key, value in tags.items():
            logger.experiment.set_tag(run_id, key, value)
    return logger


def log_config(logger: Logger, cfg: DictConfig, choices: dict[str, str]) -> None:
    params = {g: choices[g] for g in GROUPS if g in choices}
    params.update(flatten(cfg))
    logger.log_hyperparams(params)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_sample_image(logger: Logger, x, y, index: int = 4) -> None:
    """The book's picture: plt.imshow(train_images[4], cmap=plt.cm.binary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(x[index].reshape(28, 28).cpu().numpy(), cmap=plt.cm.binary)
    ax.set_title(f"train image {index}: label {int(y[index])}")
    ax.axis("off")
    logger.experiment.log_figure(logger.run_id, fig, f"train_image_{index}.png")
    plt.close(fig)

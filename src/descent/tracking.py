"""MLflow: where runs go, what they record, and metric writes batched off the hot path."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

# the config groups whose chosen option becomes a param of its own, for "group by" in the UI
GROUPS = ("data", "model", "optimizer", "batching")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def tracking_uri(uri: str, launch_dir: str | Path) -> str:
    """A relative sqlite path is relative to the launch directory, where `mlflow ui` opens it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(launch_dir) / uri[len(prefix):]).resolve())
    return uri


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


class Logger(MLFlowLogger):
    """Lightning's MLflow logger, with metric points buffered and written in a few log_batch calls.

    One synchronous DB write per log point would cost more than an epoch of the seed run; here the
    points go out every `flush_seconds`, at each checkpoint and at the end. The run's final status
    is set by train.py (FINISHED, FAILED or KILLED), not by lightning's finalize after fit.
    """

    def __init__(self, *args, flush_seconds: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.flush_seconds = flush_seconds
        self.pending: list = []
        self.last_flush = time.monotonic()

    def log_metrics(self, metrics, step=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items())
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), MAX_BATCH):
            self.experiment.log_batch(self.run_id, metrics=self.pending[i : i + MAX_BATCH])
        self.pending.clear()
        self.last_flush = time.monotonic()

    def save(self) -> None:
        self.flush()

    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        self.flush()
        if status != "success":  # a crash inside lightning: record it now, the process may not get further
            self.experiment.set_terminated(self.run_id, "FAILED")

    def end(self, status: str) -> None:
        if self._initialized:
            self.flush()
            self.experiment.set_terminated(self.run_id, status)


def run_name(choices: dict[str, str], seed: int) -> str:
    return f"{choices.get('optimizer', 'opt')}-{choices.get('batching', 'batch')}-s{seed}"


def make_logger(cfg: DictConfig, choices: dict[str, str], launch_dir: str, tags: dict[str, str]) -> Logger:
    tags = {k: v for k, v in tags.items() if v is not None}
    commit = git_commit(launch_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return Logger(
        experiment_name=cfg.logger.experiment_name,
        run_name=run_name(choices, cfg.seed),
        tracking_uri=tracking_uri(cfg.logger.tracking_uri, launch_dir),
        tags=tags,
        flush_seconds=cfg.logger.flush_seconds,
    )


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

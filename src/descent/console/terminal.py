"""What `python src/train.py` prints: one line saying what runs, the examples bar per epoch
(descent/console/progress.py), and a closing block with the final metrics, the MLflow run and where to look.

The screen is set up by conf/hydra/job_logging/descent.yaml: a console handler with `Screen` (the message;
warnings and errors say so) and `Quiet` (the known third-party chatter dropped, by logger and message), and
the run folder's train.log with every record, timestamped. `hydra.verbose=true` shows everything on screen.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# (logger name or its parent, message start): lines every run printed that tell the user nothing they can act
# on. Only these exact messages go; anything else, from the same loggers too, still shows.
NOISE = [
    ("mlflow.store.db.utils", "Creating initial MLflow database tables"),  # a new sqlite store
    ("mlflow.store.db.utils", "Updating database tables"),
    ("alembic.runtime.plugins", "setup plugin "),  # MLflow's schema migrations, step by step
    ("alembic.runtime.migration", "Context impl "),
    ("alembic.runtime.migration", "Will assume "),
    ("alembic.runtime.migration", "Running upgrade "),
    ("mlflow.system_metrics", "Skip logging GPU metrics"),  # logger.system_metrics on a machine without a GPU
    ("mlflow.system_metrics", "Started monitoring system metrics"),
    ("mlflow.system_metrics", "Stopping system metrics monitoring"),
    ("mlflow.system_metrics", "Successfully terminated system metrics monitoring"),
    ("pytorch_lightning", "GPU available: "),  # the start line names the device
    ("pytorch_lightning", "TPU available: "),
    ("pytorch_lightning", "HPU available: "),
    ("pytorch_lightning", "LOCAL_RANK: "),
    ("pytorch_lightning", "💡 Tip: For seamless cloud logging"),  # an advertisement
    ("pytorch_lightning", "`Trainer.fit` stopped: `max_epochs="),  # the bars show the epochs
    ("pytorch_lightning", "Restoring states from the checkpoint path at "),  # train.py says it resumes
    ("pytorch_lightning", "Restored all states from the checkpoint"),
    # matplotlib's first import on a machine builds its font cache and says so (once per machine)
    ("matplotlib.font_manager", "generated new fontManager"),
    ("matplotlib.font_manager", "Matplotlib is building the font cache"),
    # warnings (logging.captureWarnings): "<file>:<line>: <Category>: <message>"
    ("py.warnings", re.compile(r".*: The `srun` command is available on your system but is not used")),
    ("py.warnings", re.compile(r".*: `isinstance\(treespec, LeafSpec\)` is deprecated")),  # lightning vs torch 2.x
    # descent's data module resumes a chunk exactly where it stopped; lightning cannot know that
    ("py.warnings", re.compile(r".*: You're resuming from a checkpoint that ended before the epoch ended")),
]


def _is(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


class Quiet(logging.Filter):
    """The screen's filter: descent's details (DEBUG) and the NOISE above stay in the log file only,
    unless Hydra is verbose (`hydra.verbose=true` sets the root logger to DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().level <= logging.DEBUG and logging.getLogger().level != logging.NOTSET:
            return True
        if record.levelno < logging.INFO:
            return False
        if record.levelno >= logging.ERROR:
            return True  # never hide an error
        message = record.getMessage()
        for name, start in NOISE:
            if _is(record.name, name) and (
                start.match(message) if isinstance(start, re.Pattern) else message.startswith(start)
            ):
                return False
        return True


class Screen(logging.Formatter):
    """The message alone; a warning or an error says so, and from where when it is not descent's."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno < logging.WARNING:
            return text
        where = "" if _is(record.name, "descent") or record.name in ("__main__", "py.warnings") else f" ({record.name})"
        return f"{record.levelname}{where}: {text}"


def metric_text(key: str, value: float) -> str:
    """A loss to 4 digits, an accuracy as a percentage with 2 decimals."""
    return f"{100 * value:.2f}%" if key.endswith("acc") else f"{value:.4f}"


def shown(path: str | Path, launch_dir: str | Path | None = None) -> str:
    """A path as typed from the launch directory (default: the working directory) when it lies under it."""
    path, launch_dir = Path(path).resolve(), Path(launch_dir or os.getcwd()).resolve()
    return str(path.relative_to(launch_dir)) if path.is_relative_to(launch_dir) else str(path)


def shown_uri(uri: str, launch_dir: str | Path) -> str:
    """A sqlite store under the launch directory as typed there: sqlite:///mlflow.db."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and Path(uri[len(prefix) :]).is_absolute():
        return prefix + shown(uri[len(prefix) :], launch_dir)
    return uri


def start_line(trainer, module, name: str, choices: dict[str, str], uri: str, out_dir: str) -> None:
    """The line saying what runs, once the data is loaded and the device chosen (at fit start)."""
    import torch

    dm, device = trainer.datamodule, module.device
    sizes = ", ".join(
        f"{len(x)} {split}" for split, x in (("train", dm.x_train), ("val", dm.x_val), ("test", dm.x_test)) if len(x)
    )
    device = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    log.info(
        "%s (%s): %s examples; %s, %d threads; MLflow %s; output %s",
        name,
        " ".join(f"{k}={v}" for k, v in choices.items()),
        sizes,
        device,
        torch.get_num_threads(),
        uri,
        out_dir,
    )


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def how_to_look(uri: str, launch_dir: str | Path, experiment_id: str, run_id: str) -> str:
    """The UI page of a run: the tracking server's, or `make ui`'s over a local store."""
    from descent.tracking import store
    from descent.services import ui

    if uri.startswith(("http://", "https://")):
        return f"open {run_url(uri, experiment_id, run_id)}"
    make_ui = "make ui"  # in the launch directory: the store in $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    if store.tracking_uri(ui.store_uri(), launch_dir) != store.tracking_uri(uri, launch_dir):
        make_ui = f"MLFLOW_TRACKING_URI={uri} make ui"
    return f"{make_ui}, then open {run_url(f'http://{ui.HOST}:5000', experiment_id, run_id)}"


def closing(logger, metrics: dict[str, float], uri: str, launch_dir: str | Path, module) -> None:
    """The final metrics (loss to 4 digits, accuracy in %), the MLflow run and how to look at it."""
    final = ", ".join(f"{k} {metric_text(k, v)}" for k, v in metrics.items())
    log.info(
        "%s after %d examples, %d updates, %.1f s of training\nMLflow run %s (%s, experiment %s)\nto look at it: %s",
        final,
        module.examples,
        module.updates,
        module.train_seconds,
        logger.run_id,
        logger.run_name,
        logger.experiment_name,
        how_to_look(uri, launch_dir, logger.experiment_id, logger.run_id),
    )


def quiet_mlflow_prints(verbose) -> None:
    """Unless hydra.verbose: no MLflow bar as it downloads a checkpoint, no "View run" lines (the closing block
    names the run)."""
    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def quiet_third_parties() -> None:
    """Before MLflow is imported: its loggers go through Hydra's handlers (the screen filtered, the log file
    complete) instead of a stderr handler of its own; warnings become log records, filtered alike."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    logging.captureWarnings(True)

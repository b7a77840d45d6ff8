"""What the MLflow UI has columns for: the data a run used, the machine it ran on, the model it made.

train.py calls these around fit/test: `log_datasets` at the start, `SystemMetrics` for the run's
lifetime, `log_model` after the test. They write through MlflowClient to the run lightning's logger
opened, so they work the same on a sqlite file and on a tracking server.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from descent.console.progress import ExamplesProgressBar
from descent.tracking.mlflow_private import stop_monitor
from descent.tracking.store import retry

if TYPE_CHECKING:  # only for the annotation: importing mlflow.data at start-up costs time
    import mlflow.data

log = logging.getLogger(__name__)

CONTEXTS = {"train": "x_train", "validation": "x_val", "test": "x_test"}  # MLflow's context tag -> datamodule field
DIGEST_CHARS = 32  # MLflow stores at most 36


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the exact tensors trained or evaluated on: equal digests mean equal data (in order)."""
    h = hashlib.sha256()
    for t in (x, y):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:DIGEST_CHARS]


def datasets(datamodule, name: str) -> dict[str, mlflow.data.Dataset]:
    """One MLflow dataset per non-empty split: name "<data> (train, N×features)", digest, source (the split's
    file or folder, datamodule.split_source), schema. A torchvision set or a user's file names itself."""
    import mlflow.data

    name = getattr(datamodule, "title", None) or name
    found = {}
    for context, field in CONTEXTS.items():
        x, y = getattr(datamodule, field), getattr(datamodule, "y" + field[1:])
        if len(x) == 0:  # data.val_size=0: no validation split
            continue
        shape = "×".join(map(str, x.shape))
        with warnings.catch_warnings():  # MLflow registers two equal "local" source classes and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            found[context] = mlflow.data.from_numpy(
                x.detach().cpu().numpy(),
                targets=y.detach().cpu().numpy(),
                source=datamodule.split_source(context),  # a toy's: its code
                name=f"{name} ({context}, {shape})",
                digest=digest(x, y),
            )
    return found


def log_datasets(logger, datamodule, name: str) -> dict[str, str]:
    """Record the run's train/validation/test data as MLflow dataset inputs; returns context -> digest."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    found = datasets(datamodule, name)
    inputs = [
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for context, ds in found.items()
    ]
    # parallel jobs log the same dataset to one experiment: MLflow looks it up, then inserts it, so one of two
    # jobs can lose the insert (UNIQUE constraint, rolled back); its retry finds the other's row and links it
    retry(
        logger.experiment.log_inputs,
        logger.run_id,
        datasets=inputs,
        races=("UNIQUE constraint failed: datasets", "duplicate key value violates unique constraint"),
    )
    return {context: ds.digest for context, ds in found.items()}


def log_model(
    logger,
    net: torch.nn.Module,
    x_example: torch.Tensor,
    step: int,
    register_as: str | None = None,
    shape: tuple[int, ...] | None = None,
    classes: int | None = None,
):
    """The trained network as an MLflow Model: the data's features as float32 rows -> one score per class
    (logits); signature and input example from the data (shape: one example's, for the metadata's words).

    Saved with torch.export (MLflow's default "pt2" format): loading it needs torch, not descent's
    code and no unpickling of arbitrary objects. `step` (examples seen) links the run's metrics at
    that step (test/acc, ...) to the model on its page. Returns MLflow's ModelInfo.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    net = copy.deepcopy(net).eval().to("cpu")  # the module's own stays where and as it is
    example = x_example[:5].detach().cpu().numpy().astype(np.float32)
    with torch.no_grad():
        scores = net(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, scores)  # tensors (-1, features) float32 -> (-1, classes) float32
    features, classes = example.shape[1], classes or scores.shape[1]
    if shape is not None and len(shape) == 3:
        words = (
            f"{features} float32 values in [0, 1], a {'x'.join(map(str, shape))} image (channels, height, "
            "width) row by row"
        )
    else:
        words = f"{features} float32 features, as in the training data"
    logger.flush()  # metric points first: the model links the run's metrics at its step
    # log_model writes through MLflow's global state: this run's store, and its experiment (else the
    # model would land in the store's default experiment, where runs:/<id>/model does not look)
    mlflow.set_tracking_uri(logger.tracking_uri)
    mlflow.set_experiment(experiment_id=logger.experiment_id)
    return mlflow.pytorch.log_model(
        net,
        name="model",
        signature=signature,
        input_example=example,
        step=step,
        run_id=logger.run_id,
        registered_model_name=register_as,
        # given, not inferred: inferring loads the model in a subprocess (seconds)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        metadata={
            "input": words,
            "output": f"{classes} class scores (logits); argmax is the class label 0..{classes - 1}",
        },
    )


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) for one run.

    MLflow's monitor publishes an average every `sampling_interval` seconds and drops what it sampled
    since the last one when it stops; a run shorter than one interval would have none. finish() also
    publishes that remainder, so every run gets at least one point.
    """

    def __init__(self, run_id: str, tracking_uri: str, sampling_interval: float = 10, resume: bool = False):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=sampling_interval,
            samples_before_logging=1,
            resume_logging=resume,
            tracking_uri=tracking_uri,
        )

    def start(self) -> "SystemMetrics":
        self.started = time.monotonic()
        self.monitor.start()
        return self

    def finish(self, publish: bool = True) -> None:
        m = self.monitor
        if not stop_monitor(m) or not publish:
            return
        if not any(mon.metrics for mon in m.monitors):
            m.collect_metrics()  # stopped before its first sample was published
        try:
            m.publish_metrics(m.aggregate_metrics())
            m.mlflow_logger.flush()
        except Exception as e:  # the run's record matters more than these points
            log.warning("system metrics not recorded: %s", e)


class Record(pl.Callback):
    """Datasets when fit starts, system metrics until the run's last step, the model after the test.

    The model comes last so that it carries the final weights and links the test metrics; a run that
    fails, diverges or is stopped gets no model, and its system metrics end where it ended.
    """

    def __init__(
        self,
        logger,
        data_name: str,
        log_model: bool = True,
        register_model: str | None = None,
        system_metrics: bool = True,
        resumed: bool = False,
        sampling_interval: float = 10,
        log_errors: bool = False,
    ):
        self.logger, self.data_name, self.log_errors = logger, data_name, log_errors
        self.log_model, self.register_model = log_model, register_model
        self.machine = (
            SystemMetrics(logger.run_id, logger.tracking_uri, sampling_interval, resumed) if system_metrics else None
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.machine:
            self.machine.start()
        self.digests = log_datasets(self.logger, trainer.datamodule, self.data_name)

    def on_test_end(self, trainer, pl_module) -> None:
        if self.log_errors and pl_module.classifies:  # what the model gets wrong: descent/reports/errors.py
            from descent.reports import errors

            tic = time.perf_counter()
            try:
                errors.log_errors(self.logger, torch.cat(pl_module.test_logits), trainer.datamodule, self.data_name)
                log.debug(
                    "confusion matrix, per-class table and misclassified images logged in %.2f s",
                    time.perf_counter() - tic,
                )
            except Exception as e:  # the run's record (model, status) matters more than these pictures
                log.warning("what the model gets wrong was not recorded (%s: %s)", type(e).__name__, e)
        # registering needs the model; a toy loss's point (descent/nets/toy.py) is no network to serve
        if (self.log_model or self.register_model) and pl_module.classifies:
            tic = time.perf_counter()
            dm = trainer.datamodule
            log_model(
                self.logger, pl_module.net, dm.x_test, pl_module.examples, self.register_model, dm.shape, dm.classes
            )
            log.debug("model logged in %.1f s: runs:/%s/model", time.perf_counter() - tic, self.logger.run_id)
        self.finish()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # with the tracking server gone, publishing the last points would only wait for it
        self.finish(publish=not getattr(self.logger, "away", False))

    def finish(self, publish: bool = True) -> None:
        if self.machine:
            self.machine.finish(publish)
            self.machine = None


def callbacks(cfg, hc, logger, choices: dict[str, str], resumed: bool) -> list[pl.Callback]:
    """What src/train.py adds to its Trainer from this module and descent/console/progress.py."""
    name = choices.get("data") or str(cfg.data.name).lower()  # the config group's option: "mnist"
    found = [
        Record(
            logger,
            name,
            cfg.logger.log_model,
            cfg.logger.register_model,
            cfg.logger.system_metrics,
            resumed,
            log_errors=OmegaConf.select(cfg, "logger.log_errors", default=False),
        )
    ]
    if cfg.trainer.progress_bar:  # lightning refuses a bar among the callbacks when it is switched off
        found.append(ExamplesProgressBar.for_job(hc, logger.run_name))
    return found

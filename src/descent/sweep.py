"""Hydra callback: one MLflow parent run per multirun, and the convergence report when it ends."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def parent_run_id(cfg: DictConfig, launch_dir: str, sweep_dir: str) -> str | None:
    """A job's parent run, found in the tracking store (a job on another node sees no sweep folder)."""
    from mlflow import MlflowClient

    from descent import store

    client = MlflowClient(store.tracking_uri(cfg.logger.tracking_uri, launch_dir))
    return store.retry(store.find_parent, client, cfg.logger.experiment_name, str(sweep_dir))


class MLflowSweep(Callback):
    def __init__(self, target_acc: float = 0.97, report: bool = True):
        self.target_acc, self.report = target_acc, report
        self.client = self.run_id = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from mlflow import MlflowClient

        from descent.config import ConfigError, validate_sweep

        try:  # every job, before any of them starts and before any MLflow run exists
            validate_sweep(config)
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("invalid sweep, nothing was run:\n%s", e)
            sys.exit(2)
        from descent import store

        self.uri = store.tracking_uri(config.logger.tracking_uri, os.getcwd())
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # creating the store, the experiment and the parent here, before any job starts, keeps
        # parallel jobs from racing on sqlite's schema set-up and on experiment creation
        self.client = MlflowClient(self.uri)
        experiment_id = store.experiment_id(self.client, config.logger.experiment_name)
        # jobs look their parent up by the sweep folder as configured: the same string in every job
        tags = {store.SWEEP_TAG: "true", store.SWEEP_DIR_TAG: str(self.sweep_dir),
                store.SWEEP_KEY_TAG: str(config.hydra.sweep.dir)}
        if commit := store.git_commit(os.getcwd()):
            tags["mlflow.source.git.commit"] = commit
        name = f"{config.logger.experiment_name}-{self.sweep_dir.parent.name}_{self.sweep_dir.name}"
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.experiment_id = experiment_id
        self.run_id = run.info.run_id
        params = {"overrides": " ".join(config.hydra.overrides.task) or "(none)"}
        sweeper_params = OmegaConf.select(config, "hydra.sweeper.params")
        if sweeper_params:
            params.update({f"sweep.{k}": str(v) for k, v in sweeper_params.items()})
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value[:6000])
        atexit.register(self._end_if_open)  # a sweep that dies still ends its parent run
        log.info("MLflow parent run %s (%s) for sweep %s", self.run_id, name, os.path.relpath(self.sweep_dir)
                 if self.sweep_dir.is_relative_to(Path.cwd()) else self.sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.run_id is None:
            return
        self._end_orphans()
        if self.report:
            try:
                from descent.report import launch_relative, make_report
                from descent.terminal import how_to_look

                paths = make_report(self.uri, parent_run_id=self.run_id, out_dir=self.sweep_dir,
                                    target_acc=self.target_acc)
                table = [line for line in paths["md"].read_text().splitlines() if line.startswith("|")]
                log.info("%s\nconvergence report: %s (table), %s, %s", "\n".join(table),
                         *(launch_relative(str(paths[k])) for k in ("md", "png", "csv")))
                log.info("the sweep's MLflow run %s; to look at it: %s", self.run_id,
                         how_to_look(self.uri, os.getcwd(), self.experiment_id, self.run_id))
            except Exception as e:  # the runs are recorded: a failed report must not lose them
                log.error("the convergence report failed (%s: %s); rerun it with python src/compare.py --parent %s",
                          type(e).__name__, e, self.run_id)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def _end_if_open(self) -> None:
        if self.run_id is not None:
            self._end_orphans()
            self.client.set_terminated(self.run_id, "KILLED")
            self.run_id = None

    def _end_orphans(self) -> None:
        """Children still RUNNING when their sweep ends died without a word (SIGKILL, out of memory, a lost
        node): every launcher has waited for its jobs by then, so they end FAILED, never RUNNING. (A SLURM job
        that outlives a driver stopped with Ctrl-C sets its own status again when it ends.)"""
        try:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
            orphans = self.client.search_runs(
                [experiment_id], f"tags.`mlflow.parentRunId` = '{self.run_id}' and attributes.status = 'RUNNING'")
            for run in orphans:
                self.client.set_tag(run.info.run_id, "descent.ended_by", "sweep")
                self.client.set_terminated(run.info.run_id, "FAILED")
                log.error("run %s (%s) was still RUNNING when its sweep ended (its job died without a word): "
                          "marked FAILED", run.info.run_id, run.info.run_name)
        except Exception as e:  # the store is away: the sweep's own end must still be recorded if it can
            log.error("could not check the sweep's runs for jobs that died (%s: %s)", type(e).__name__, e)

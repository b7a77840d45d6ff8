"""The sweep's driver: a Hydra callback that opens one MLflow parent run per multirun, records an Optuna study's
outcome on it, and writes the reports when the sweep ends (the job side: descent/sweep/job.py).

mlflow (2.7 s to import with pandas, -X importtime) and the reports are imported when they are used: the
sweep's config is checked first, in a second, and an invalid one fails before either.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from descent.config import OBJECTIVES, ConfigError, validate_sweep
from descent.console.terminal import how_to_look, shown
from descent.sweep.job import is_optuna, quiet_optuna, shown_storage
from descent.sweep.notes import NOTE_LIMIT, alias_best, best_child, headline, parent_note, swept_keys
from descent.tracking import names, store

log = logging.getLogger(__name__)


class MLflowSweep(Callback):
    def __init__(
        self, target_acc: float = 0.97, report: bool = True, pictures: str | None = None, scaling: bool = False
    ):
        self.target_acc, self.report = target_acc, report
        self.pictures = (
            pictures  # a figure of descent/reports/pictures.py drawn beside the report (the chapter's presets)
        )
        self.scaling = scaling  # the batch-size scaling report (descent/reports/scaling.py: experiment=batch_scaling)
        self.client = self.run_id = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:  # every job, before any of them starts and before any MLflow run exists
            validate_sweep(config)
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("invalid sweep, nothing was run:\n%s", e)
            sys.exit(2)
        from mlflow import MlflowClient

        self.uri = store.tracking_uri(config.logger.tracking_uri, os.getcwd())
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # creating the store, the experiment and the parent here, before any job starts, keeps
        # parallel jobs from racing on sqlite's schema set-up and on experiment creation
        self.client = MlflowClient(self.uri)
        experiment_id = store.experiment_id(self.client, config.logger.experiment_name)
        # jobs look their parent up by the sweep folder as configured: the same string in every job
        tags = {names.SWEEP: "true", names.SWEEP_DIR: str(self.sweep_dir), names.SWEEP_KEY: str(config.hydra.sweep.dir)}
        if commit := store.git_commit(os.getcwd()):
            tags[names.GIT_COMMIT] = commit
        name = f"{config.logger.experiment_name}-{self.sweep_dir.parent.name}_{self.sweep_dir.name}"
        self.study = None
        if is_optuna(config.hydra.sweeper):  # an Optuna study: its record on the parent, as tags (a study
            # that goes on may change n_trials); the study's parent when it has one already
            quiet_optuna()
            self.study = self._study_tags(config)
            tags |= self.study
        recorded = {}
        if self.study and (parent := self._study_parent(experiment_id)) is not None:
            self.run_id, name, recorded = parent.info.run_id, parent.info.run_name, parent.data.params
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            log.info("the study %s goes on under its parent run %s", self.study[names.STUDY], self.run_id)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.experiment_id = experiment_id
        self._describe(config)
        params = {"overrides": " ".join(config.hydra.overrides.task) or "(none)"}
        sweeper_params = OmegaConf.select(config, "hydra.sweeper.params")
        if sweeper_params:
            params.update({f"sweep.{k}": str(v) for k, v in sweeper_params.items()})
        for key, value in params.items():
            if key not in recorded:  # params are immutable: a study that goes on keeps its first ones
                self.client.log_param(self.run_id, key, value[:6000])
        atexit.register(self._end_if_open)  # a sweep that dies still ends its parent run
        log.info("MLflow parent run %s (%s) for sweep %s", self.run_id, name, shown(self.sweep_dir))

    def _study_tags(self, config: DictConfig) -> dict[str, str]:
        sweeper = config.hydra.sweeper
        pruner = sweeper.get("pruner")
        self.storage = store.tracking_uri(str(sweeper.storage), os.getcwd())
        from hydra_plugins.descent_optuna_sweeper._impl import grid_studies  # optuna: a study's only

        grid = sweeper.get("grid")
        self.studies = grid_studies(str(sweeper.study_name), grid)  # [(name, the grid's overrides)]: one without
        grid_tag = {names.STUDY_GRID: json.dumps(OmegaConf.to_container(grid))} if grid else {}
        return grid_tag | {
            names.STUDY: str(sweeper.study_name),
            names.STUDY_STORAGE: shown_storage(self.storage),
            names.STUDY_SAMPLER: str(sweeper.sampler._target_).rsplit(".", 1)[-1],
            names.STUDY_SAMPLER_SEED: str(sweeper.sampler.get("seed")),
            names.STUDY_PRUNER: str(pruner._target_).rsplit(".", 1)[-1] if pruner else "none",
            names.STUDY_DIRECTION: str(sweeper.direction),
            names.STUDY_OBJECTIVE: str(config.sweep.objective),
            names.STUDY_N_TRIALS: str(sweeper.n_trials),
        }

    def _study_parent(self, experiment_id: str):
        """The parent run of this study from an earlier command (same study name and storage), if any."""
        quote = lambda v: v.replace("'", "\\'")
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.`{names.STUDY}` = '{quote(self.study[names.STUDY])}' and "
            f"tags.`{names.STUDY_STORAGE}` = '{quote(self.study[names.STUDY_STORAGE])}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _record_study(self) -> bool:
        """The study's outcome on its parent run: trials by state, the best trial. False when none completed."""
        import optuna
        from optuna.trial import TrialState

        trials, tags, completed = [], {}, []
        for name, cell in self.studies:  # one study, or one per combination of a grid
            try:
                study = optuna.load_study(study_name=name, storage=self.storage)
            except KeyError:  # a grid's study the sweep never reached (it stopped before)
                continue
            found = study.get_trials(deepcopy=False)
            done = [t for t in found if t.state == TrialState.COMPLETE]
            trials += found
            completed += done
            if cell:  # a grid's study: its best under a tag named by its values (optuna.best.sgd-16)
                best = (
                    min(done, key=lambda t: t.value)
                    if study.direction.name == "MINIMIZE" and done
                    else (max(done, key=lambda t: t.value) if done else None)
                )
                tags[names.STUDY_BEST + name.removeprefix(str(self.study[names.STUDY]) + "-")] = json.dumps(
                    {"trial": best.number, "value": best.value, "params": best.params} if best else None
                )
                if not done:
                    log.warning(
                        "the study %s has no completed trial (%s): no best trial there",
                        name,
                        ", ".join(sorted({t.state.name for t in found})) or "no trials",
                    )
            elif done:
                best = study.best_trial
                tags |= {
                    names.STUDY_BEST_TRIAL: str(best.number),
                    names.STUDY_BEST_VALUE: repr(best.value),
                    names.STUDY_BEST_PARAMS: json.dumps(best.params),
                }
                self.client.log_metric(self.run_id, names.OPTUNA_BEST_VALUE, best.value, step=len(found))
            else:
                tags |= {names.STUDY_BEST_TRIAL: "none"}
        states = [t.state.name for t in trials]
        tags |= {names.STUDY_TRIALS: str(len(trials))} | {
            f"{names.STUDY_TRIALS}.{s}": str(states.count(s)) for s in dict.fromkeys(states)
        }
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value[:5000])
        if not completed:
            counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
            log.error(
                "the study %s has no completed trial (%s): no best trial; each trial's run says why "
                "(diverged, failed, pruned, missed its target)",
                self.study[names.STUDY],
                counts,
            )
        return bool(completed)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.run_id is None:
            return
        self._end_orphans()
        found = True
        if self.study:
            try:
                found = self._record_study()
            except Exception as e:  # the runs are recorded: a study that cannot be read must not lose them
                log.error("could not record the study's outcome on its parent run (%s: %s)", type(e).__name__, e)
        headlines = []  # the report's tables, for the parent's description
        if self.report:
            try:
                from descent.reports.convergence import make_report  # mlflow, matplotlib: the sweep's end only

                paths = make_report(
                    self.uri, parent_run_id=self.run_id, out_dir=self.sweep_dir, target_acc=self.target_acc
                )
                headlines += [headline(paths[k].read_text()) for k in ("md", "search_md") if k in paths]
                log.info(
                    "%s\nconvergence report: %s (table), %s, %s",
                    headlines[0],
                    *(shown(paths[k]) for k in ("md", "png", "csv")),
                )
                if "search_md" in paths:  # an Optuna study: its trials, the best in bold
                    log.info(
                        "%s\nthe search: %s (table), %s",
                        headlines[1],
                        *(shown(paths[k]) for k in ("search_md", "search_png")),
                    )
                log.info(
                    "the sweep's MLflow run %s; to look at it: %s",
                    self.run_id,
                    how_to_look(self.uri, os.getcwd(), self.experiment_id, self.run_id),
                )
            except Exception as e:  # the runs are recorded: a failed report must not lose them
                log.error(
                    "the convergence report failed (%s: %s); rerun it with python src/compare.py --parent %s",
                    type(e).__name__,
                    e,
                    self.run_id,
                )
        if self.pictures:
            try:
                from descent.reports import pictures  # torch, matplotlib: the sweep's end only

                paths = pictures.make(self.pictures, self.uri, self.run_id, self.sweep_dir)
                log.info(
                    "%s\n%s: %s, %s",
                    paths["md"].read_text().split("\n\n![")[0],
                    self.pictures,
                    *(shown(paths[k]) for k in ("md", "png")),
                )
            except Exception as e:  # as the report's
                log.error(
                    "the %s figure failed (%s: %s); rerun it with python src/compare.py --parent %s --pictures %s",
                    self.pictures,
                    type(e).__name__,
                    e,
                    self.run_id,
                    self.pictures,
                )
        if self.scaling:
            try:
                from descent.reports.scaling import make_scaling_report  # as the report's

                paths = make_scaling_report(self.uri, self.run_id, self.sweep_dir)
                log.info(
                    "%s\nscaling report: %s (table), %s, %s, %s (every trial)",
                    paths["summary"],
                    *(shown(paths[k]) for k in ("md", "png", "csv", "trials")),
                )
            except Exception as e:
                log.error(
                    "the scaling report failed (%s: %s); rerun it with python src/compare.py --scaling --parent %s",
                    type(e).__name__,
                    e,
                    self.run_id,
                )
        try:
            self._record_best(config, headlines)
        except Exception as e:  # as the report's: the runs are recorded
            log.error("could not name the sweep's best run (%s: %s)", type(e).__name__, e)
        self.client.set_terminated(self.run_id, "FINISHED" if found else "FAILED")
        self.run_id = None
        if not found:
            sys.exit(1)

    def _describe(self, config: DictConfig) -> None:
        """The parent's description (its question, its command, what it varies) and the keys its jobs vary."""
        keys = swept_keys(config)
        self.note = parent_note(config, keys, sys.argv)
        self.client.set_tag(self.run_id, names.SWEEP_VARIES, json.dumps(keys))
        self.client.set_tag(self.run_id, names.NOTE, self.note[:NOTE_LIMIT])

    def _record_best(self, config: DictConfig, headlines: list[str]) -> None:
        """At the end: the best child (by sweep.objective) named on the parent, its model aliased `best` when
        registered (logger.register_model), and the report's tables added to the parent's description."""
        objective = str(OmegaConf.select(config, "sweep.objective", default=names.VAL_LOSS))
        direction = str(
            OmegaConf.select(config, "hydra.sweeper.direction", default=None)
            if self.study
            else OBJECTIVES.get(objective, "minimize")
        )
        best = best_child(self.client, self.run_id, objective, direction)
        note = self.note
        if best is not None:
            value = best.data.metrics[objective]
            self.client.set_tag(self.run_id, names.SWEEP_BEST, best.info.run_id)
            note += f"\n\nBest run ({direction} {objective}): {best.info.run_name} ({objective} {value:.4g})"
            name = OmegaConf.select(config, "logger.register_model")
            if name:
                version = alias_best(self.client, str(name), best)
                if version is None:
                    log.warning(
                        "the best run %s has no version of registered model %s: no alias `best`", best.info.run_id, name
                    )
                else:
                    note += f"; its model: `models:/{name}@best` (version {version})"
                    log.info(
                        "the sweep's best run %s (%s %.4g): models:/%s@best is its model (version %s)",
                        best.info.run_name,
                        objective,
                        value,
                        name,
                        version,
                    )
            note += "."
        if headlines:
            note += "\n\n" + "\n\n".join(headlines)
        self.client.set_tag(self.run_id, names.NOTE, note[:NOTE_LIMIT])

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
                [experiment_id], f"tags.`{names.PARENT}` = '{self.run_id}' and attributes.status = 'RUNNING'"
            )
            for run in orphans:
                self.client.set_tag(run.info.run_id, names.ENDED_BY, "sweep")
                self.client.set_terminated(run.info.run_id, "FAILED")
                log.error(
                    "run %s (%s) was still RUNNING when its sweep ended (its job died without a word): marked FAILED",
                    run.info.run_id,
                    run.info.run_name,
                )
        except Exception as e:  # the store is away: the sweep's own end must still be recorded if it can
            log.error("could not check the sweep's runs for jobs that died (%s: %s)", type(e).__name__, e)

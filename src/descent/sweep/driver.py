"""Hydra callback: one MLflow parent run per multirun, and the convergence report when it ends."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def parent_run_id(cfg: DictConfig, launch_dir: str, sweep_dir: str) -> str | None:
    """A job's parent run, found in the tracking store (a job on another node sees no sweep folder)."""
    from mlflow import MlflowClient

    from descent.tracking import store

    client = MlflowClient(store.tracking_uri(cfg.logger.tracking_uri, launch_dir))
    return store.retry(store.find_parent, client, cfg.logger.experiment_name, str(sweep_dir))


# -- Optuna studies (hydra/sweeper=optuna, src/hydra_plugins/descent_optuna_sweeper) ------------------------

OPTUNA_SWEEPER = "hydra_plugins.descent_optuna_sweeper."


class Pruned(Exception):
    """The study's pruner stopped this trial at a validation point."""


def is_optuna(sweeper) -> bool:
    return str(OmegaConf.select(sweeper, "_target_", default="")).startswith(OPTUNA_SWEEPER)


def shown_storage(storage: str) -> str:
    """A study's storage URL as it may be recorded: as given, without its password (user:***@host)."""
    return re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", storage)


def optuna_trial(sweeper, launch_dir: str):
    """The Optuna trial a job of a study runs (the sweeper names it: hydra.sweeper.trial), or None."""
    if not is_optuna(sweeper) or OmegaConf.select(sweeper, "trial") is None:
        return None
    import optuna
    from hydra.utils import instantiate

    from descent.tracking import store

    quiet_optuna()
    pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
    study = optuna.load_study(study_name=sweeper.study_name, pruner=pruner,
                              storage=store.tracking_uri(sweeper.storage, launch_dir))
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, sweeper.trial)
    return optuna.trial.Trial(study, trial_id)


class Pruning:
    """The loop's validation hook in a trial: the objective to the pruner at step = examples seen."""

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective

    def __call__(self, examples: int, metrics: dict) -> None:
        value = metrics.get(self.objective)
        if value is None or value != value:
            return  # no validation data, or NaN: the trial fails at its end, it is not pruned
        self.trial.report(value, examples)
        if self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number} pruned at {examples} examples ({self.objective} {value:.4g})")


def target_key(what: str, acc: float) -> str:
    """The metric of one target's first crossing: target/updates/0.97 (MLflow's names admit no @)."""
    return f"target/{what}/{acc:g}"


class Target:
    """The loop's validation hook for sweep.objective=target/*: at the first validation point where val/acc
    reaches sweep.target_acc it logs target/updates, target/examples and target/seconds (training seconds)
    and stops the run there (lightning's should_stop; the loop takes no further update). On the way, the first
    crossing of each of sweep.targets (and of target_acc) is logged once as target/updates/<acc>,
    target/examples/<acc>, target/seconds/<acc>; which were logged is in the checkpoint (state_dict), so a run
    stopped and resumed between two targets logs each of them once.

    In a study (`trial` given) each crossing is also the trial's user attribute (target/updates/0.97: the
    study's sampler and later trials read it), and a run is pruned once it can no longer win any target it
    has not reached: it has spent as many updates (examples) as the study's best trial took to each of them
    (Shallue et al. 2019). The bests are read at each validation point, so trials running side by side
    (hydra.sweeper.n_jobs, a cluster) bound each other as they finish. A trial the study marks as a
    measurement (user attribute descent.prune false: descent/sweep/protocol.py's seed re-runs) is never pruned."""

    def __init__(self, module, target_acc: float, trial=None, objective: str = "target/updates",
                 targets=()):
        self.module, self.target_acc, self.reached = module, target_acc, False
        self.trial, self.objective = trial, objective
        self.accs = sorted({float(a) for a in targets if float(a) <= target_acc} | {float(target_acc)})
        self.crossed: list[float] = []  # the targets logged so far (in the checkpoint)
        self.prunes = trial is not None and trial.user_attrs.get("descent.prune", True)

    def state_dict(self) -> dict:
        return {"crossed": list(self.crossed), "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.crossed, self.reached = list(state["crossed"]), bool(state["reached"])

    def __call__(self, examples: int, metrics: dict) -> None:
        m = self.module
        acc = metrics.get("val/acc")
        if self.reached:
            return
        if acc is not None:
            for t in self.accs:
                if acc >= t and t not in self.crossed:
                    self.crossed.append(t)
                    point = {"updates": m.updates, "examples": examples, "seconds": m.train_seconds}
                    m.record({target_key(k, t): v for k, v in point.items()})
                    if self.trial is not None:
                        for k, v in point.items():
                            self.trial.set_user_attr(target_key(k, t), v)
        if acc is not None and acc >= self.target_acc:
            self.reached = True
            m.record({"target/updates": m.updates, "target/examples": examples, "target/seconds": m.train_seconds})
            m.trainer.should_stop = True
            return
        what = self.objective.split("/")[1]
        spent = m.updates if what == "updates" else examples
        if self.prunes and spent >= (bound := self.best(what)):
            raise Pruned(f"trial {self.trial.number} pruned at {examples} examples: {spent} {what} without "
                         f"val/acc >= {self.open_targets()[0]:g}, and the study's best trials reached each target "
                         f"not yet reached in at most {bound:.0f}")

    def open_targets(self) -> list[float]:
        return [t for t in self.accs if t not in self.crossed]

    def best(self, what: str = "updates") -> float:
        """The most the run may still spend: the largest, over the targets it has not reached, of the study's
        fewest updates (examples) to that target so far (any trial's crossing, pruned or not; inf before any)."""
        found = self.trial.study.get_trials(deepcopy=False)
        bounds = []
        for t in self.open_targets():
            key = target_key(what, t)
            done = [tr.user_attrs[key] for tr in found if key in tr.user_attrs and tr.number != self.trial.number]
            if t == self.target_acc:  # trials recorded before per-target attributes: their objective value
                done += [tr.value for tr in found if tr.state.name == "COMPLETE" and key not in tr.user_attrs]
            bounds.append(min(done, default=float("inf")))
        return max(bounds, default=float("inf"))


def quiet_optuna() -> None:
    """Optuna's messages through Hydra's logging (the screen's filter, train.log), not its own stderr handler."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


class MLflowSweep(Callback):
    def __init__(self, target_acc: float = 0.97, report: bool = True, pictures: str | None = None,
                 scaling: bool = False):
        self.target_acc, self.report = target_acc, report
        self.pictures = pictures  # a figure of descent/reports/pictures.py drawn beside the report (the chapter's presets)
        self.scaling = scaling  # the batch-size scaling report (descent/reports/scaling.py: experiment=batch_scaling)
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
        from descent.tracking import store

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
            log.info("the study %s goes on under its parent run %s", self.study["optuna.study"], self.run_id)
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
        log.info("MLflow parent run %s (%s) for sweep %s", self.run_id, name, os.path.relpath(self.sweep_dir)
                 if self.sweep_dir.is_relative_to(Path.cwd()) else self.sweep_dir)

    def _study_tags(self, config: DictConfig) -> dict[str, str]:
        from descent.tracking import store

        sweeper = config.hydra.sweeper
        pruner = sweeper.get("pruner")
        self.storage = store.tracking_uri(str(sweeper.storage), os.getcwd())
        from hydra_plugins.descent_optuna_sweeper._impl import grid_studies

        grid = sweeper.get("grid")
        self.studies = grid_studies(str(sweeper.study_name), grid)  # [(name, the grid's overrides)]: one without
        grid_tag = {"optuna.grid": json.dumps(OmegaConf.to_container(grid))} if grid else {}
        return grid_tag | {"optuna.study": str(sweeper.study_name), "optuna.storage": shown_storage(self.storage),
                           "optuna.sampler": str(sweeper.sampler._target_).rsplit(".", 1)[-1],
                           "optuna.sampler.seed": str(sweeper.sampler.get("seed")),
                           "optuna.pruner": str(pruner._target_).rsplit(".", 1)[-1] if pruner else "none",
                           "optuna.direction": str(sweeper.direction), "optuna.objective": str(config.sweep.objective),
                           "optuna.n_trials": str(sweeper.n_trials)}

    def _study_parent(self, experiment_id: str):
        """The parent run of this study from an earlier command (same study name and storage), if any."""
        quote = lambda v: v.replace("'", "\\'")
        runs = self.client.search_runs(
            [experiment_id], f"tags.`optuna.study` = '{quote(self.study['optuna.study'])}' and "
                             f"tags.`optuna.storage` = '{quote(self.study['optuna.storage'])}'",
            order_by=["attributes.start_time DESC"], max_results=1)
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
                best = min(done, key=lambda t: t.value) if study.direction.name == "MINIMIZE" and done else (
                    max(done, key=lambda t: t.value) if done else None)
                tags[f"optuna.best.{name.removeprefix(str(self.study['optuna.study']) + '-')}"] = json.dumps(
                    {"trial": best.number, "value": best.value, "params": best.params} if best else None)
                if not done:
                    log.warning("the study %s has no completed trial (%s): no best trial there", name,
                                ", ".join(sorted({t.state.name for t in found})) or "no trials")
            elif done:
                best = study.best_trial
                tags |= {"optuna.best_trial": str(best.number), "optuna.best_value": repr(best.value),
                         "optuna.best_params": json.dumps(best.params)}
                self.client.log_metric(self.run_id, "optuna/best_value", best.value, step=len(found))
            else:
                tags |= {"optuna.best_trial": "none"}
        states = [t.state.name for t in trials]
        tags |= {"optuna.trials": str(len(trials))} | {f"optuna.trials.{s}": str(states.count(s))
                                                        for s in dict.fromkeys(states)}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value[:5000])
        if not completed:
            counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
            log.error("the study %s has no completed trial (%s): no best trial; each trial's run says why "
                      "(diverged, failed, pruned, missed its target)", self.study["optuna.study"], counts)
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
                from descent.reports.convergence import launch_relative, make_report
                from descent.console.terminal import how_to_look

                paths = make_report(self.uri, parent_run_id=self.run_id, out_dir=self.sweep_dir,
                                    target_acc=self.target_acc)
                headlines += [headline(paths[k].read_text()) for k in ("md", "search_md") if k in paths]
                log.info("%s\nconvergence report: %s (table), %s, %s", headlines[0],
                         *(launch_relative(str(paths[k])) for k in ("md", "png", "csv")))
                if "search_md" in paths:  # an Optuna study: its trials, the best in bold
                    log.info("%s\nthe search: %s (table), %s", headlines[1],
                             *(launch_relative(str(paths[k])) for k in ("search_md", "search_png")))
                log.info("the sweep's MLflow run %s; to look at it: %s", self.run_id,
                         how_to_look(self.uri, os.getcwd(), self.experiment_id, self.run_id))
            except Exception as e:  # the runs are recorded: a failed report must not lose them
                log.error("the convergence report failed (%s: %s); rerun it with python src/compare.py --parent %s",
                          type(e).__name__, e, self.run_id)
        if self.pictures:
            try:
                from descent.reports import pictures
                from descent.reports.convergence import launch_relative

                paths = pictures.make(self.pictures, self.uri, self.run_id, self.sweep_dir)
                log.info("%s\n%s: %s, %s", paths["md"].read_text().split("\n\n![")[0], self.pictures,
                         *(launch_relative(str(paths[k])) for k in ("md", "png")))
            except Exception as e:  # as the report's
                log.error("the %s figure failed (%s: %s); rerun it with python src/compare.py --parent %s "
                          "--pictures %s", self.pictures, type(e).__name__, e, self.run_id, self.pictures)
        if self.scaling:
            try:
                from descent.reports.scaling import make_scaling_report
                from descent.reports.convergence import launch_relative

                paths = make_scaling_report(self.uri, self.run_id, self.sweep_dir)
                log.info("%s\nscaling report: %s (table), %s, %s", paths["summary"],
                         *(launch_relative(str(paths[k])) for k in ("md", "png", "csv")))
            except Exception as e:
                log.error("the scaling report failed (%s: %s); rerun it with python src/compare.py --scaling "
                          "--parent %s", type(e).__name__, e, self.run_id)
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
        from descent.tracking.store import NOTE_TAG

        keys = swept_keys(config)
        self.note = parent_note(config, keys, sys.argv)
        self.client.set_tag(self.run_id, VARIES_TAG, json.dumps(keys))
        self.client.set_tag(self.run_id, NOTE_TAG, self.note[:NOTE_LIMIT])

    def _record_best(self, config: DictConfig, headlines: list[str]) -> None:
        """At the end: the best child (by sweep.objective) named on the parent, its model aliased `best` when
        registered (logger.register_model), and the report's tables added to the parent's description."""
        from descent.config import OBJECTIVES
        from descent.tracking.store import NOTE_TAG

        objective = str(OmegaConf.select(config, "sweep.objective", default="val/loss"))
        direction = str(OmegaConf.select(config, "hydra.sweeper.direction", default=None)
                        if self.study else OBJECTIVES.get(objective, "minimize"))
        best = best_child(self.client, self.run_id, objective, direction)
        note = self.note
        if best is not None:
            value = best.data.metrics[objective]
            self.client.set_tag(self.run_id, BEST_TAG, best.info.run_id)
            note += f"\n\nBest run ({direction} {objective}): {best.info.run_name} ({objective} {value:.4g})"
            name = OmegaConf.select(config, "logger.register_model")
            if name:
                version = alias_best(self.client, str(name), best)
                if version is None:
                    log.warning("the best run %s has no version of registered model %s: no alias `best`",
                                best.info.run_id, name)
                else:
                    note += f"; its model: `models:/{name}@best` (version {version})"
                    log.info("the sweep's best run %s (%s %.4g): models:/%s@best is its model (version %s)",
                             best.info.run_name, objective, value, name, version)
            note += "."
        if headlines:
            note += "\n\n" + "\n\n".join(headlines)
        self.client.set_tag(self.run_id, NOTE_TAG, note[:NOTE_LIMIT])

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


# -- what a sweep's runs say on their MLflow pages (descriptions), and its best model (the `best` alias) ------------

NOTE_LIMIT = 8000  # MLflow's longest tag value
VARIES_TAG = "descent.sweep.varies"  # on the parent: the keys its jobs differ in, for their descriptions
BEST_TAG = "descent.sweep.best_run"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep's jobs differ in: the command line's sweeps (a,b / range(...)) and hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return list(dict.fromkeys([*keys, *params]))


def preset_question(config: DictConfig) -> str | None:
    """The first paragraph of the chosen preset's opening comment (conf/experiment/<name>.yaml): its question."""
    name = OmegaConf.select(config, "hydra.runtime.choices.experiment")
    if not name:
        return None
    for source in OmegaConf.select(config, "hydra.runtime.config_sources") or []:
        if source.get("schema") != "file":
            continue
        path = Path(source.path) / "experiment" / f"{name}.yaml"
        if path.is_file():
            lines = []
            for line in path.read_text().splitlines():
                if not line.startswith("#") or line.startswith("# @package"):
                    if lines:
                        break
                    continue
                text = line[1:].strip()
                if not text:
                    if lines:
                        break
                    continue
                lines.append(text)
            return " ".join(lines) or None
    return None


def parent_note(config: DictConfig, keys: list[str], argv: list[str]) -> str:
    """A sweep's description at its start: its question, the command that ran it, what its jobs vary."""
    import shlex

    question = preset_question(config)
    command = shlex.join(["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]])
    varies = ", ".join(f"`{k}`" for k in keys) or "nothing (one job per seed or repeat)"
    what = f"**{question}**" if question else f"A sweep over {varies}."
    return f"{what}\n\nCommand: `{command}`\n\nIts jobs vary {varies}; each job is a child run."


def job_tags(cfg: DictConfig, launch_dir: str, hc) -> dict[str, str]:
    """A job's link to its parent run and its description: the values it takes of the keys its sweep varies."""
    from mlflow import MlflowClient

    from descent.tracking import store

    parent_id = parent_run_id(cfg, launch_dir, hc.sweep.dir)
    if parent_id is None:
        return {}
    parent = store.retry(MlflowClient(store.tracking_uri(cfg.logger.tracking_uri, launch_dir)).get_run, parent_id)
    keys = json.loads(parent.data.tags.get(VARIES_TAG, "[]"))
    values = {}
    for override in hc.overrides.task:
        key, _, value = override.partition("=")
        values[key.lstrip("+~")] = value
    mine = " ".join(f"{k}={values[k]}" for k in (k.lstrip("+~") for k in keys) if k in values)
    note = (f"Job {hc.job.num} of the sweep {parent.info.run_name}: {mine or 'no swept key set'} "
            "(the rest as the sweep's command, on the parent run).")
    return {store.PARENT_TAG: parent_id, store.NOTE_TAG: note}


def headline(md: str) -> str:
    """A report's headline table, as Markdown: its table lines."""
    return "\n".join(line for line in md.splitlines() if line.startswith("|"))


def best_child(client, parent_id: str, objective: str, direction: str):
    """The sweep's finished child with the best objective (its last value, what train.py returned), or None."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                                   "attributes.status = 'FINISHED'", max_results=50000)
    scored = [(r.data.metrics[objective], r) for r in children
              if objective in r.data.metrics and r.data.metrics[objective] == r.data.metrics[objective]
              and r.data.tags.get("optuna.state", "COMPLETE") == "COMPLETE"]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda vr: vr[0])[1]


def alias_best(client, name: str, run) -> str | None:
    """The alias `best` of registered model `name` on the version the run logged; its version, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version)).version
    client.set_registered_model_alias(name, "best", version)
    return version

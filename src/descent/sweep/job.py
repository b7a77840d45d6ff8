"""A sweep's job side, in the job's process: its link to the parent run, its Optuna trial, and the loop's
validation hooks a trial or a target adds (pruning, the target's first crossings, where the run stops).

The sweep's driver (descent/sweep/driver.py) imports this module at Hydra's start: mlflow (2.7 s with pandas,
-X importtime) and optuna (0.34 s) are imported where they are used, not here.
"""

from __future__ import annotations

import json
import math
import re

from omegaconf import DictConfig, OmegaConf

from descent.tracking import names, store


def parent_run_id(cfg: DictConfig, launch_dir: str, sweep_dir: str) -> str | None:
    """A job's parent run, found in the tracking store (a job on another node sees no sweep folder)."""
    from mlflow import MlflowClient

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

    quiet_optuna()
    pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
    study = optuna.load_study(
        study_name=sweeper.study_name, pruner=pruner, storage=store.tracking_uri(sweeper.storage, launch_dir)
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, sweeper.trial)
    return optuna.trial.Trial(study, trial_id)


def stop_where_the_study_says(cfg: DictConfig, trial) -> None:
    """A study's protocol may end a trial below sweep.target_acc (descent.stop: a seed run at the highest target
    its rate was chosen for, descent/sweep/protocol.py): the run's config, and so its record, says where it stops."""
    stop = trial.user_attrs.get(names.STOP) if trial is not None else None
    if stop is not None and stop < OmegaConf.select(cfg, "sweep.target_acc", default=math.inf):
        OmegaConf.update(cfg, "sweep.target_acc", float(stop), force_add=True)


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
    (Shallue et al. 2019); or once it has spent its deadline for a target without reaching it (user attribute
    descent.bound, {target: updates}: the protocol's deadline from the next smaller batch size). The bests are
    read at each validation point, so trials running side by side
    (hydra.sweeper.n_jobs, a cluster) bound each other as they finish. A trial the study marks as a
    measurement (user attribute descent.prune false: descent/sweep/protocol.py's seed re-runs) is never pruned."""

    def __init__(self, module, target_acc: float, trial=None, objective: str = names.TARGET_UPDATES, targets=()):
        self.module, self.target_acc, self.reached = module, target_acc, False
        self.trial, self.objective = trial, objective
        self.accs = sorted({float(a) for a in targets if float(a) <= target_acc} | {float(target_acc)})
        self.crossed: list[float] = []  # the targets logged so far (in the checkpoint)
        self.prunes = trial is not None and trial.user_attrs.get(names.PRUNE, True)

    def state_dict(self) -> dict:
        return {"crossed": list(self.crossed), "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.crossed, self.reached = list(state["crossed"]), bool(state["reached"])

    def __call__(self, examples: int, metrics: dict) -> None:
        m = self.module
        acc = metrics.get(names.VAL_ACC)
        if self.reached:
            return
        if acc is not None:
            for t in self.accs:
                if acc >= t and t not in self.crossed:
                    self.crossed.append(t)
                    point = {"updates": m.updates, "examples": examples, "seconds": m.train_seconds}
                    m.record({names.target_key(k, t): v for k, v in point.items()})
                    if self.trial is not None:
                        for k, v in point.items():
                            self.trial.set_user_attr(names.target_key(k, t), v)
        if acc is not None and acc >= self.target_acc:
            self.reached = True
            m.record(
                {
                    names.TARGET_UPDATES: m.updates,
                    names.TARGET_EXAMPLES: examples,
                    names.TARGET_SECONDS: m.train_seconds,
                }
            )
            m.trainer.should_stop = True
            return
        what = self.objective.split("/")[1]
        spent = m.updates if what == "updates" else examples
        if self.prunes and spent >= (bound := self.best(what)):
            raise Pruned(
                f"trial {self.trial.number} pruned at {examples} examples: {spent} {what} without "
                f"val/acc >= {self.open_targets()[0]:g}, and the study's best trials reached each target "
                f"not yet reached in at most {bound:.0f}"
            )
        if self.prunes and (late := [(t, cap) for t, cap in self.deadlines() if m.updates >= cap]):
            t, cap = late[0]
            raise Pruned(
                f"trial {self.trial.number} pruned at {examples} examples: {m.updates} updates without val/acc >= "
                f"{t:g}, its deadline from the next smaller batch size ({cap:.0f} updates)"
            )

    def deadlines(self) -> list[tuple[float, float]]:
        """(target, updates) for each target not yet reached that the study gave this trial a deadline for."""
        given = self.trial.user_attrs.get(names.BOUND, {})
        return [(t, float(given[k])) for t in self.open_targets() for k in given if float(k) == t]

    def open_targets(self) -> list[float]:
        return [t for t in self.accs if t not in self.crossed]

    def best(self, what: str = "updates") -> float:
        """The most the run may still spend: the largest, over the targets it has not reached, of the study's
        fewest updates (examples) to that target so far (any trial's crossing, pruned or not; inf before any)."""
        found = self.trial.study.get_trials(deepcopy=False)
        bounds = []
        for t in self.open_targets():
            key = names.target_key(what, t)
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


def job_tags(cfg: DictConfig, launch_dir: str, hc) -> dict[str, str]:
    """A job's link to its parent run and its description: the values it takes of the keys its sweep varies."""
    from mlflow import MlflowClient

    parent_id = parent_run_id(cfg, launch_dir, hc.sweep.dir)
    if parent_id is None:
        return {}
    parent = store.retry(MlflowClient(store.tracking_uri(cfg.logger.tracking_uri, launch_dir)).get_run, parent_id)
    keys = json.loads(parent.data.tags.get(names.SWEEP_VARIES, "[]"))
    values = {}
    for override in hc.overrides.task:
        key, _, value = override.partition("=")
        values[key.lstrip("+~")] = value
    mine = " ".join(f"{k}={values[k]}" for k in (k.lstrip("+~") for k in keys) if k in values)
    note = (
        f"Job {hc.job.num} of the sweep {parent.info.run_name}: {mine or 'no swept key set'} "
        "(the rest as the sweep's command, on the parent run)."
    )
    return {names.PARENT: parent_id, names.NOTE: note}

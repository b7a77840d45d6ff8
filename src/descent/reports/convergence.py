"""Convergence report over a sweep's MLflow runs: curves against epochs, updates and seconds, and a table.

Used by src/compare.py and, at the end of a multirun, by the sweep's callback (`make_report`).
It reads MLflow only, with no torch or lightning import, so it starts in about a second.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from descent.tracking.store import PARENT_TAG, SWEEP_DIR_TAG, SWEEP_TAG, log_table, resolve_uri

TARGET_ACC = 0.97

# config groups in the order of run names (rmsprop-mini-s0); a label starts with the ones that vary
LABEL_GROUPS = ("optimizer", "batching", "model", "data")
# params that differ between the seeds of one configuration, or that do not change what is trained
NOT_CONFIG = {"seed", "resume", "data.root", "data.download", "trainer.progress_bar",
              "trainer.checkpoint_every_seconds"}
NOT_CONFIG_PREFIXES = ("logger.", "hydra.")

AXES = {"epochs": "progress/epoch", "updates": "progress/updates", "seconds": "progress/seconds"}
FINALS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")
LOG_X_RATIO = 10  # log-scale an x axis when the configurations' extents on it differ by this factor or more


class ReportError(RuntimeError):
    """Nothing to report: no such experiment, run or children."""


# ---------------------------------------------------------------------------------------------
# runs as read from MLflow

@dataclass
class Run:
    id: str
    name: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | SCHEDULED
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values), step = examples seen

    @property
    def diverged(self) -> bool:
        # the tag from train.py; a non-finite loss in the history counts too (runs from before the tag)
        return self.tags.get("diverged") == "true" or any(
            not np.isfinite(v).all() for k, (_, v) in self.history.items() if k.endswith("/loss"))

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and not self.diverged

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The metric up to its first non-finite value: a diverged run is drawn up to where it stopped."""
        steps, values = self.history.get(key, (np.zeros(0), np.zeros(0)))
        bad = ~np.isfinite(values)
        n = int(np.argmax(bad)) if bad.any() else len(values)
        return steps[:n], values[:n]

    @property
    def diverged_at(self) -> int | None:
        """Examples seen when the loss became non-finite (train.py's tag), if known."""
        examples = self.tags.get("diverged.examples", "")
        return int(examples) if examples.isdigit() else None

    def progress(self, axis: str, steps) -> np.ndarray:
        """Epochs, updates or training seconds at the given steps, interpolated on the examples axis
        (val points need not fall on the steps where progress/* was logged)."""
        s, v = self.history.get(AXES[axis], (np.zeros(0), np.zeros(0)))
        if not len(s) and axis == "updates" and self.diverged_at:
            # diverged before its first log point: train.py's tags still give one point
            s, v = np.array([float(self.diverged_at)]), np.array([float(self.tags["diverged.updates"])])
        if not len(s):
            return np.full(len(np.atleast_1d(steps)), np.nan)
        if s[0] > 0:  # every counter is 0 before the first example
            s, v = np.r_[0.0, s], np.r_[0.0, v]
        return np.interp(steps, s, v)

    def final(self, key: str) -> float | None:
        values = self.history.get(key, (None, ()))[1]
        return float(values[-1]) if len(values) and np.isfinite(values[-1]) else None


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    last = {m.step: m.value for m in points}  # one value per step: the latest written
    return np.array(list(last), dtype=float), np.array(list(last.values()), dtype=float)


def select_runs(client, parent_run_id: str | None = None, experiment: str = "descent", metrics=()):
    """(parent run or None, child runs): the parent's children; else the experiment's latest sweep;
    else, in an experiment without sweeps, all its runs. Histories: FINALS, AXES and `metrics`."""
    from mlflow.exceptions import MlflowException

    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as e:
            raise ReportError(f"no run {parent_run_id!r} in {client.tracking_uri}") from e
        experiment_ids = [parent.info.experiment_id]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"no experiment named {experiment!r} in {client.tracking_uri}")
        experiment_ids = [exp.experiment_id]
        sweeps = client.search_runs(experiment_ids, f"tags.`{SWEEP_TAG}` = 'true'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        parent = sweeps[0] if sweeps else None
    found = _search(client, experiment_ids, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'" if parent else "")
    if not found:
        where = f"sweep run {parent.info.run_id}" if parent else f"experiment {experiment!r}"
        raise ReportError(f"no runs to report in {where}")
    if parent:  # the sweep's job order (parallel jobs may start out of order)
        found.sort(key=lambda r: int(r.data.tags.get("hydra.job.num", 0)))
    keys = set(FINALS) | set(AXES.values()) | set(metrics)
    runs = [
        Run(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status, dict(r.data.params),
            dict(r.data.tags), {k: _history(client, r.info.run_id, k) for k in r.data.metrics if k in keys})
        for r in found
    ]
    return parent, runs


# ---------------------------------------------------------------------------------------------
# configurations: the runs that differ only by seed

@dataclass
class Config:
    label: str
    values: dict[str, str | None]  # the params that tell it apart from the others
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    def status(self) -> dict[str, int]:
        counts = {"finished": 0, "diverged": 0, "failed": 0, "killed": 0, "running": 0}
        for r in self.runs:
            kind = ("diverged" if r.diverged else "finished" if r.status == "FINISHED" else
                    "failed" if r.status == "FAILED" else "killed" if r.status == "KILLED" else "running")
            counts[kind] += 1
        return counts


def status_text(counts: dict[str, int], n: int, diverged_at: str = "") -> str:
    """ok, or how many of the n seeds did not finish and why: 1/3 diverged (at 1280 examples)."""
    kinds = [k for k in ("diverged", "failed", "killed", "running") if counts.get(k)]
    at = f" (at {diverged_at.replace(' ', ', ')} examples)" if diverged_at else ""
    return "ok" if not kinds else ", ".join(f"{counts[k]}/{n} {k}" + at * (k == "diverged") for k in kinds)


def _not_config(key: str) -> bool:
    return key in NOT_CONFIG or key.endswith(".seed") or key.startswith(NOT_CONFIG_PREFIXES)


def group(runs: list[Run]) -> tuple[list[str], list[Config]]:
    """Group by the config-group params that vary (optimizer, batching, ...), then by any other varying
    param that those do not already determine (optimizer.lr follows from optimizer=sgd, unless the
    sweep varied it too). Configurations keep the order of their first run (the sweep's job order)."""
    keys = sorted({k for r in runs for k in r.params})
    varying = [k for k in keys if not _not_config(k) and len({r.params.get(k) for r in runs}) > 1]
    groups = [g for g in LABEL_GROUPS if g in varying]
    by = list(groups)
    for key in varying:
        if key in groups:
            continue
        seen: dict[tuple, set] = {}
        for r in runs:
            seen.setdefault(tuple(r.params.get(g) for g in groups), set()).add(r.params.get(key))
        if any(len(values) > 1 for values in seen.values()):
            by.append(key)

    configs: dict[tuple, Config] = {}
    for r in runs:
        values = {b: r.params.get(b) for b in by}
        if (key := tuple(values.values())) not in configs:
            configs[key] = Config(_label(values, r), values, [])
        configs[key].runs.append(r)
    return by, list(configs.values())


def _label(values: dict[str, str | None], run: Run) -> str:
    """Like the run names (sgd-mini), then what else tells the configuration apart (optimizer.lr=0.1)."""
    name = [run.params[g] for g in ("optimizer", "batching") if g in run.params]
    name += [str(v) for k, v in values.items() if k in LABEL_GROUPS and k not in ("optimizer", "batching")]
    others = [f"{k}={v}" for k, v in values.items() if k not in LABEL_GROUPS]
    return " ".join(["-".join(name) or "runs", *others])


# ---------------------------------------------------------------------------------------------
# numbers: final metrics and time to target

def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample std (ddof=1; nan for a single seed)."""
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def time_to_target(run: Run, key: str, target: float) -> dict[str, float] | None:
    """Epochs, updates and training seconds at the first logged point where `key` >= target."""
    steps, values = run.curve(key)
    hits = np.nonzero(values >= target)[0]
    if not len(hits):
        return None
    step = steps[hits[0]]
    return {axis: float(run.progress(axis, [step])[0]) for axis in AXES}


def summarize(config: Config, target_key: str, target: float) -> dict:
    """One table row; final metrics over the seeds that finished, time to target over all seeds."""
    row = {"configuration": config.label, **config.values, "seeds": len(config.runs), **config.status(),
           "diverged_at_examples": " ".join(str(r.diverged_at) for r in config.runs if r.diverged and r.diverged_at)}
    for key in FINALS:
        finals = [v for r in config.finished if (v := r.final(key)) is not None]
        name = key.replace("/", "_")
        row[f"{name}_mean"], row[f"{name}_std"] = mean_std(finals) or (None, None)
        row[f"{name}_n"] = len(finals)
    hits = [t for r in config.runs if (t := time_to_target(r, target_key, target)) is not None]
    row.update(target_metric=target_key, target=target, reached=len(hits))
    for axis in AXES:
        stats = mean_std([h[axis] for h in hits if np.isfinite(h[axis])])
        row[f"{axis}_to_target_mean"], row[f"{axis}_to_target_std"] = stats or (None, None)
    return row


# ---------------------------------------------------------------------------------------------
# the figure: loss (top) and accuracy (bottom) against epochs, updates and seconds

def mean_curve(runs: list[Run], key: str, axis: str):
    """x, mean, min, max over the runs, on the steps they all reached (x: mean over runs)."""
    curves = [(r, *r.curve(key)) for r in runs]
    curves = [(r, s, v) for r, s, v in curves if len(s)]
    if not curves:
        return None
    lo, hi = max(s[0] for _, s, _ in curves), min(s[-1] for _, s, _ in curves)
    grid = np.unique(np.concatenate([s for _, s, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = np.array([np.interp(grid, s, v) for _, s, v in curves])
    xs = np.array([r.progress(axis, grid) for r, _, _ in curves])
    if np.isnan(xs).all():
        return None
    return np.nanmean(xs, axis=0), ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot(configs: list[Config], source: str = "val", title: str = ""):
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # object API, no pyplot: no global backend state to disturb
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, len(AXES), squeeze=False)
    palette = colormaps["tab10" if len(configs) <= 10 else "tab20"]  # 5 optimizers x 3 regimes = 15 lines
    colors = [palette(i % palette.N) for i in range(len(configs))]
    what = "validation loss and accuracy" if source == "val" else "training loss and accuracy (no validation data)"
    extents: dict[str, list[float]] = {axis: [] for axis in AXES}
    handles, any_diverged, any_unfinished = [], False, False

    for config, color in zip(configs, colors):
        for row, metric in enumerate(("loss", "acc")):
            key = f"{source}/{metric}"
            for col, axis in enumerate(AXES):
                ax = axes[row, col]
                curve = mean_curve(config.finished, key, axis)
                if curve is not None:
                    x, mean, lo, hi = curve
                    ax.plot(x, mean, color=color, lw=1.6, marker="." if len(x) <= 30 else None)
                    ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
                    extents[axis].append(np.nanmax(x))
                for run in config.runs:  # the rest one by one: diverged, failed, killed, still running
                    if run.finished:
                        continue
                    steps, values = run.curve(key)
                    x = run.progress(axis, steps)
                    if len(steps) and not np.isnan(x).all():
                        any_unfinished = True
                        ax.plot(x, values, color=color, lw=1, ls="--", alpha=0.8)
                        extents[axis].append(np.nanmax(x))
                        if run.diverged:
                            any_diverged = True
                            ax.plot(x[-1], values[-1], "x", color=color, ms=10, mew=2.5)
                    elif run.diverged and run.diverged_at:
                        # no finite point to draw: mark where it diverged, on the top edge
                        x_at = run.progress(axis, [run.diverged_at])[0]
                        if np.isfinite(x_at):
                            any_diverged = True
                            ax.plot([x_at], [0.98], "x", color=color, ms=10, mew=2.5, clip_on=False,
                                    transform=ax.get_xaxis_transform())
                            extents[axis].append(x_at)
        status = status_text(config.status(), len(config.runs))
        label = config.label + ("" if status == "ok" else f" ({status})")
        handles.append(Line2D([], [], color=color, lw=1.6, label=f"{label}, n={len(config.runs)}"))

    for col, axis in enumerate(AXES):
        ext = [e for e in extents[axis] if np.isfinite(e) and e > 0]
        log_x = len(ext) > 1 and max(ext) / min(ext) >= LOG_X_RATIO
        for row, metric in enumerate(("loss", "acc")):
            ax = axes[row, col]
            if log_x:
                ax.set_xscale("log")
                _plain_log_ticks(ax.xaxis)
            if metric == "loss":
                ax.set_yscale("log")  # losses span decades, and a diverging run's more so
                _plain_log_ticks(ax.yaxis)
            ax.set_xlabel({"epochs": "epochs", "updates": "optimizer updates",
                           "seconds": "training wall time (s)"}[axis] + (" (log scale)" if log_x else ""))
            ax.set_ylabel(f"{source} {metric}" + ("" if source == "val" else " (no validation data)"))
            ax.grid(True, which="major", alpha=0.3)
    if any_unfinished:
        handles.append(Line2D([], [], color="gray", lw=1, ls="--", label="a seed that did not finish"))
    if any_diverged:
        handles.append(Line2D([], [], color="gray", ls="", marker="x", ms=10, mew=2.5,
                              label="diverged: at its last finite point, or on the top edge if it had none"))
    wide = max(len(h.get_label()) for h in handles) > 40
    fig.legend(handles=handles, loc="outside lower center", ncols=1 if wide else min(4, len(handles)), frameon=False)
    fig.suptitle(f"{title}\n{what}: line = mean over the seeds that finished, band = min–max over those seeds")
    return fig


# ---------------------------------------------------------------------------------------------
# an Optuna study: the objective trial by trial, the best so far, and against the searched parameters

STUDY_TAG = "optuna.study"


def search_rows(runs: list[Run], objective: str, params: list[str]) -> list[dict]:
    """One row per trial, by study (a grid's cells in order) then trial: its state, parameters, the objective's
    last value (a pruned trial's at its stop) and the training examples it spent."""
    rows = []
    for r in runs:
        if "optuna.trial" not in r.tags:
            continue
        steps, values = r.history.get(objective, (np.zeros(0), np.zeros(0)))
        finite = np.isfinite(values)
        state = r.tags.get("optuna.state") or {"FINISHED": "COMPLETE", "RUNNING": "RUNNING"}.get(r.status, "FAIL")
        seen = [s[-1] for s, _ in r.history.values() if len(s)]  # its last point of any metric (steps = examples)
        rows.append({"study": r.tags.get("optuna.study", ""), "trial": int(r.tags["optuna.trial"]), "state": state,
                     "run": r.name,
                     **{p: r.params.get(p) for p in params},
                     "objective": float(values[finite][-1]) if state != "FAIL" and finite.any() else None,
                     "examples": int(max(seen)) if seen else None})
    studies = list(dict.fromkeys(row["study"] for row in rows))  # a grid's cells (hydra.sweeper.grid) in order
    return sorted(rows, key=lambda row: (studies.index(row["study"]), row["trial"]))


def best_so_far(rows: list[dict], maximize: bool) -> list[float | None]:
    """Per row, the best complete value so far in its own study (a grid runs one study per cell)."""
    best, out = {}, []
    for row in rows:
        if row["state"] == "COMPLETE" and row["objective"] is not None:
            value, so_far = row["objective"], best.get(row["study"])
            best[row["study"]] = value if so_far is None else (max if maximize else min)(so_far, value)
        out.append(best.get(row["study"]))
    return out


def _numbers(values) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values])
    except (TypeError, ValueError):
        return None  # a categorical parameter (choice of names)


def plot_search(rows: list[dict], objective: str, maximize: bool, params: list[str], title: str = ""):
    """History (objective per trial, best so far) and, for one or two parameters, the objective against them.
    Complete trials filled, pruned ones hollow at the value they stopped with, failed ones as x on the top
    edge. A grid's studies (one per cell) each in a colour of their own, trials numbered within each."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    studies = list(dict.fromkeys(r["study"] for r in rows))
    palette = colormaps["tab10" if len(studies) <= 10 else "tab20"]
    color = {st: palette(i % palette.N) for i, st in enumerate(studies)} if len(studies) > 1 else {studies[0]: "C0"}
    space = len(params) in (1, 2)
    fig = Figure(figsize=(13 if space else 7, 5 + 0.25 * (len(studies) // 4)), layout="constrained")
    axes = fig.subplots(1, 2 if space else 1, squeeze=False)[0]
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["objective"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["objective"] is not None]
    failed = [r for r in rows if r not in complete and r not in pruned]
    values = [r["objective"] for r in complete + pruned]
    log_y = objective.endswith("loss") and values and min(values) > 0 and max(values) / min(values) >= LOG_X_RATIO
    best = best_so_far(rows, maximize)

    def marks(ax, x_of, group, hollow=False):
        for r in group:
            ax.plot([x_of(r)], [r["objective"]], "o", color=color[r["study"]], **({"mfc": "none"} if hollow else {}))

    def fails(ax, x_of):
        for r in failed:
            if (x := x_of(r)) is not None:
                ax.plot([x], [0.98], "x", color=color[r["study"]] if len(studies) > 1 else "C3", ms=9, mew=2,
                        clip_on=False, transform=ax.get_xaxis_transform())

    ax = axes[0]
    trial = lambda r: r["trial"]
    marks(ax, trial, complete), marks(ax, trial, pruned, hollow=True), fails(ax, trial)
    for st in studies:
        own = [(r["trial"], np.nan if b is None else b) for r, b in zip(rows, best) if r["study"] == st]
        ax.step(*zip(*own), where="post", color="C1" if len(studies) == 1 else color[st], ls="-" if len(studies) == 1 else "--")
    ax.set_xlabel("trial" + (" (of its study)" if len(studies) > 1 else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(objective)
    ax.set_title("the search, trial by trial")

    if space:
        ax = axes[1]
        value = lambda p: (lambda r: (n[0] if (n := _numbers([r[p]])) is not None else r[p]))
        if len(params) == 1:
            marks(ax, value(params[0]), complete), marks(ax, value(params[0]), pruned, hollow=True)
            fails(ax, value(params[0]))
            ax.set_ylabel(objective)
        else:
            points = complete + pruned
            x, y = (_numbers([r[p] for r in points]) for p in params)
            if x is not None and y is not None and points:
                c = ax.scatter(x, y, c=[r["objective"] for r in points], cmap="viridis",
                               edgecolors=["k" if r in complete else "none" for r in points])
                fig.colorbar(c, ax=ax, label=objective)
            for r in failed:
                xy = [_numbers([r[p]]) for p in params]
                if xy[0] is not None and xy[1] is not None:
                    ax.plot(xy[0], xy[1], "x", color="C3", ms=9, mew=2)
            ax.set_ylabel(params[1])
            y_all = _numbers([r[params[1]] for r in rows])
            if y_all is not None and y_all.min() > 0 and y_all.max() / y_all.min() >= LOG_X_RATIO:
                ax.set_yscale("log")
                _plain_log_ticks(ax.yaxis)
        x_all = _numbers([r[params[0]] for r in rows])
        if x_all is not None and len(x_all) and x_all.min() > 0 and x_all.max() / x_all.min() >= LOG_X_RATIO:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(params[0])
        ax.set_title("the objective against the searched parameters" if len(params) == 2 else
                     "the objective against the searched parameter")
    if log_y:
        for a in axes[: 1 if len(params) == 2 else None]:
            a.set_yscale("log")
            _plain_log_ticks(a.yaxis)
    handles = [Line2D([], [], color="gray" if len(studies) > 1 else "C0", ls="", marker="o",
                      label=f"complete ({len(complete)})"),
               Line2D([], [], color="gray" if len(studies) > 1 else "C0", ls="", marker="o", mfc="none",
                      label=f"pruned, at its stop ({len(pruned)})"),
               Line2D([], [], color="gray" if len(studies) > 1 else "C3", ls="", marker="x", mew=2,
                      label=f"failed or diverged ({len(failed)})"),
               Line2D([], [], color="gray" if len(studies) > 1 else "C1", ls="--" if len(studies) > 1 else "-",
                      label=f"best so far ({'max' if maximize else 'min'})")]
    if len(studies) > 1:  # the grid's cells
        handles += [Line2D([], [], color=color[st], lw=6, label=st) for st in studies]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(title)
    return fig


def search_markdown(rows: list[dict], objective: str, maximize: bool, params: list[str], header: str) -> str:
    """One row per trial; each study's best in bold (a grid runs one study per cell: a study column then)."""
    so_far = best_so_far(rows, maximize)
    best = {r["study"]: b for r, b in zip(rows, so_far)}  # the last row of each study holds its best
    grid = len(best) > 1
    summary = ("each study's best in bold" if grid else "best " + (_metric(best[rows[0]["study"]]) if rows and
               best[rows[0]["study"]] is not None else "none: no trial completed"))
    lines = [header, "", f"Objective `{objective}` ({'maximized' if maximize else 'minimized'}); {summary}"
             f"; training examples spent, all trials: {sum(r['examples'] or 0 for r in rows):,}.", "",
             "| " + " | ".join(["study"] * grid + ["trial", "state", *params, objective, "examples", "run"]) + " |",
             "|---" * (len(params) + 5 + grid) + "|"]
    for r in rows:
        value = _metric(r["objective"]) if r["objective"] is not None else "–"
        if r["state"] == "COMPLETE" and r["objective"] == best[r["study"]]:
            value = f"**{value}**"
        cells = [r["study"]] * grid + [r["trial"], r["state"], *(r[p] for p in params), value,
                                       r["examples"] if r["examples"] is not None else "–", r["run"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _plain_log_ticks(axis) -> None:
    """Ticks as 0.5, 1, 2, 100 rather than 5×10^-1; minor ticks labelled on short axes only."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lo, hi = sorted(axis.get_view_interval())
        mantissa = round(v / 10 ** np.floor(np.log10(v)))
        span = hi / lo if lo > 0 else np.inf
        return f"{v:g}" if span < 4 or (span < 100 and mantissa in (2, 5)) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


# ---------------------------------------------------------------------------------------------
# the table: Markdown for people, CSV for programs

def _num(x: float) -> str:  # epochs, updates, seconds
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _metric(x: float) -> str:  # a loss or an accuracy
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"


def _pm(mean, std, fmt=_num, fmt_std=lambda s: f"{s:.2g}") -> str:
    if mean is None:
        return "—"
    return fmt(mean) if std is None or np.isnan(std) else f"{fmt(mean)} ± {fmt_std(std)}"


def markdown(rows: list[dict], header: str) -> str:
    target_key, target = rows[0]["target_metric"], rows[0]["target"]
    to = f"to {target_key.replace('/', ' ')} ≥ {target:g}"
    cols = ["configuration", "seeds", "status", *[k.replace("/", " ") for k in FINALS],
            f"epochs {to}", f"updates {to}", f"seconds {to}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        status = status_text(row, row["seeds"], row["diverged_at_examples"])
        cells = [row["configuration"].replace("|", "\\|"), str(row["seeds"]), status]
        for key in FINALS:
            name = key.replace("/", "_")
            cells.append(_pm(row[f"{name}_mean"], row[f"{name}_std"], _metric, _metric))
        for axis in AXES:
            if not row["reached"]:
                cells.append("not reached")
                continue
            cell = _pm(row[f"{axis}_to_target_mean"], row[f"{axis}_to_target_std"])
            if row["reached"] < row["seeds"]:
                cell += f" ({row['reached']}/{row['seeds']} seeds)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = (
        f"Final values: mean ± sample std over the seeds that finished (one seed: its value; — : none finished). "
        f"Time to target: the first logged point where {target_key} ≥ {target:g}, mapped to epochs, updates and "
        f"training seconds by interpolating the progress/* metrics on the examples-seen axis; mean ± std over "
        f"the seeds that reached it."
    )
    return f"{header}\n\n" + "\n".join(lines) + f"\n\n{notes}\n\n![convergence](convergence.png)\n"


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None or (isinstance(v, float) and np.isnan(v)) else v
                             for k, v in row.items()})


# ---------------------------------------------------------------------------------------------

def launch_relative(path: str) -> str:
    """A folder as named from the launch directory (the tags hold this machine's absolute paths)."""
    return os.path.relpath(path) if Path(path).is_absolute() else path


def default_out(parent) -> Path:
    sweep_dir = parent.data.tags.get(SWEEP_DIR_TAG) if parent else None
    return Path(sweep_dir) if sweep_dir else Path("outputs/reports") / time.strftime("%Y-%m-%d_%H-%M-%S")


def make_report(tracking_uri: str | None = None, parent_run_id: str | None = None, experiment: str = "descent",
                out_dir: str | Path | None = None, target_acc: float = TARGET_ACC) -> dict[str, Path]:
    """Write convergence.{png,md,csv} and, when the runs belong to a sweep, log them to its parent run
    under report/; for an Optuna study also search.{png,md}. Returns {"png", "md", "csv"[, "search_png",
    "search_md"]} -> path."""
    from mlflow import MlflowClient

    client = MlflowClient(resolve_uri(tracking_uri))
    parent, runs = select_runs(client, parent_run_id, experiment)
    by, configs = group(runs)
    source = "val" if any("val/acc" in r.history for r in runs) else "train"
    rows = [summarize(c, f"{source}/acc", target_acc) for c in configs]
    tables = {"convergence": rows}

    if parent:
        what = f"Sweep `{parent.info.run_name}` (run `{parent.info.run_id}`)"
        where = f" ({launch_relative(parent.data.tags[SWEEP_DIR_TAG])})" if parent.data.tags.get(SWEEP_DIR_TAG) else ""
    else:
        what, where = f"All runs of experiment `{experiment}` (no sweep found)", ""
    grouped = ", ".join(by) if by else "nothing varies"
    header = (f"# Convergence report\n\n{what}{where}: {len(runs)} runs in {len(configs)} configurations "
              f"(grouped by {grouped}); target {source}/acc ≥ {target_acc:g}.")

    out = (Path(out_dir) if out_dir is not None else default_out(parent)).absolute()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "convergence.png", "md": out / "convergence.md", "csv": out / "convergence.csv"}
    # the figure names the sweep and its run, never a folder: a title travels (docs, a report shared) where
    # this machine's paths mean nothing; the title is also the PNG's Title, which tests and docs read back
    title = what.replace("`", "") + f" — {len(runs)} runs, {len(configs)} configurations"
    plot(configs, source, title).savefig(paths["png"], dpi=100, metadata={"Title": title})
    paths["md"].write_text(markdown(rows, header))
    write_csv(rows, paths["csv"])
    if parent and STUDY_TAG in parent.data.tags:  # an Optuna study: its search, beside the curves
        objective = parent.data.tags.get("optuna.objective", "val/loss")
        maximize = parent.data.tags.get("optuna.direction") == "maximize"
        grid = json.loads(parent.data.tags.get("optuna.grid", "{}"))  # a grid's keys tell its studies apart
        searched = [b for b in by if b not in grid]
        params = [b for b in searched if _numbers([r.params.get(b) for r in runs]) is not None] or searched
        for r in runs:  # an objective beside FINALS (target/updates, ...)
            if objective not in r.history:
                r.history[objective] = _history(client, r.id, objective)
        rows = search_rows(runs, objective, params)
        if rows:
            tables["search"] = rows
            paths |= {"search_png": out / "search.png", "search_md": out / "search.md"}
            study = parent.data.tags[STUDY_TAG]
            plot_search(rows, objective, maximize, params,
                        f"Optuna study {study} — {what.replace('`', '')}").savefig(paths["search_png"], dpi=100)
            paths["search_md"].write_text(search_markdown(rows, objective, maximize, params,
                                                          f"# Search: Optuna study `{study}`\n\n{what}."))
    if parent:
        import pandas as pd

        for path in paths.values():
            client.log_artifact(parent.info.run_id, str(path), "report")
        for name, table in tables.items():  # the tables above, as MLflow tables (the run's artifacts show them)
            log_table(client, parent.info.run_id, pd.DataFrame(table), f"report/{name}.json")
    return paths

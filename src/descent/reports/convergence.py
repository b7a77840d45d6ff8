"""Convergence report over a sweep's MLflow runs: curves against epochs, updates and seconds, and a table.

Used by src/compare.py and, at the end of a multirun, by the sweep's callback (`make_report`); an Optuna
study's search beside it (descent/reports/search.py). It reads MLflow only, with no torch or lightning import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # object API, no pyplot: no global backend state to disturb
from matplotlib.lines import Line2D

from descent.console.terminal import shown
from descent.reports import skeleton
from descent.reports.search import make_search
from descent.reports.skeleton import (
    AXES,
    FINALS,
    LOG_X_RATIO,
    ReportError,
    Run,
    metric,
    plain_log_ticks,
    select_runs,
    table,
)
from descent.tracking import names
from descent.tracking.store import log_table

TARGET_ACC = 0.97

# config groups in the order of run names (rmsprop-mini-s0); a label starts with the ones that vary
LABEL_GROUPS = ("optimizer", "batching", "model", "data")
# params that differ between the seeds of one configuration, or that do not change what is trained
NOT_CONFIG = {
    "seed",
    "resume",
    "data.root",
    "data.download",
    "trainer.progress_bar",
    "trainer.checkpoint_every_seconds",
}
NOT_CONFIG_PREFIXES = ("logger.", "hydra.")
__all__ = ["ReportError", "make_report", "select_runs"]  # src/compare.py and the sweep's driver use these here


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
            kind = (
                "diverged"
                if r.diverged
                else "finished"
                if r.status == "FINISHED"
                else "failed"
                if r.status == "FAILED"
                else "killed"
                if r.status == "KILLED"
                else "running"
            )
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
    row = {
        "configuration": config.label,
        **config.values,
        "seeds": len(config.runs),
        **config.status(),
        "diverged_at_examples": " ".join(str(r.diverged_at) for r in config.runs if r.diverged and r.diverged_at),
    }
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
    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, len(AXES), squeeze=False)
    palette = colormaps["tab10" if len(configs) <= 10 else "tab20"]  # 5 optimizers x 3 regimes = 15 lines
    colors = [palette(i % palette.N) for i in range(len(configs))]
    what = "validation loss and accuracy" if source == "val" else "training loss and accuracy (no validation data)"
    extents: dict[str, list[float]] = {axis: [] for axis in AXES}
    handles, any_diverged, any_unfinished = [], False, False

    for config, color in zip(configs, colors):
        for row, kind in enumerate(("loss", "acc")):
            key = f"{source}/{kind}"
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
                            ax.plot(
                                [x_at],
                                [0.98],
                                "x",
                                color=color,
                                ms=10,
                                mew=2.5,
                                clip_on=False,
                                transform=ax.get_xaxis_transform(),
                            )
                            extents[axis].append(x_at)
        status = status_text(config.status(), len(config.runs))
        label = config.label + ("" if status == "ok" else f" ({status})")
        handles.append(Line2D([], [], color=color, lw=1.6, label=f"{label}, n={len(config.runs)}"))

    for col, axis in enumerate(AXES):
        ext = [e for e in extents[axis] if np.isfinite(e) and e > 0]
        log_x = len(ext) > 1 and max(ext) / min(ext) >= LOG_X_RATIO
        for row, kind in enumerate(("loss", "acc")):
            ax = axes[row, col]
            if log_x:
                ax.set_xscale("log")
                plain_log_ticks(ax.xaxis)
            if kind == "loss":
                ax.set_yscale("log")  # losses span decades, and a diverging run's more so
                plain_log_ticks(ax.yaxis)
            ax.set_xlabel(
                {"epochs": "epochs", "updates": "optimizer updates", "seconds": "training wall time (s)"}[axis]
                + (" (log scale)" if log_x else "")
            )
            ax.set_ylabel(f"{source} {kind}" + ("" if source == "val" else " (no validation data)"))
            ax.grid(True, which="major", alpha=0.3)
    if any_unfinished:
        handles.append(Line2D([], [], color="gray", lw=1, ls="--", label="a seed that did not finish"))
    if any_diverged:
        handles.append(
            Line2D(
                [],
                [],
                color="gray",
                ls="",
                marker="x",
                ms=10,
                mew=2.5,
                label="diverged: at its last finite point, or on the top edge if it had none",
            )
        )
    wide = max(len(h.get_label()) for h in handles) > 40
    fig.legend(handles=handles, loc="outside lower center", ncols=1 if wide else min(4, len(handles)), frameon=False)
    fig.suptitle(f"{title}\n{what}: line = mean over the seeds that finished, band = min–max over those seeds")
    return fig


# ---------------------------------------------------------------------------------------------
# the table: Markdown for people, CSV for programs


def _num(x: float) -> str:  # epochs, updates, seconds
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _pm(mean, std, fmt=_num, fmt_std=lambda s: f"{s:.2g}") -> str:
    if mean is None:
        return "—"
    return fmt(mean) if std is None or np.isnan(std) else f"{fmt(mean)} ± {fmt_std(std)}"


def markdown(rows: list[dict], header: str) -> str:
    target_key, target = rows[0]["target_metric"], rows[0]["target"]
    to = f"to {target_key.replace('/', ' ')} ≥ {target:g}"
    cols = [
        "configuration",
        "seeds",
        "status",
        *[k.replace("/", " ") for k in FINALS],
        f"epochs {to}",
        f"updates {to}",
        f"seconds {to}",
    ]
    lines = []
    for row in rows:
        status = status_text(row, row["seeds"], row["diverged_at_examples"])
        cells = [row["configuration"].replace("|", "\\|"), str(row["seeds"]), status]
        for key in FINALS:
            name = key.replace("/", "_")
            cells.append(_pm(row[f"{name}_mean"], row[f"{name}_std"], metric, metric))
        for axis in AXES:
            if not row["reached"]:
                cells.append("not reached")
                continue
            cell = _pm(row[f"{axis}_to_target_mean"], row[f"{axis}_to_target_std"])
            if row["reached"] < row["seeds"]:
                cell += f" ({row['reached']}/{row['seeds']} seeds)"
            cells.append(cell)
        lines.append(cells)
    notes = (
        f"Final values: mean ± sample std over the seeds that finished (one seed: its value; — : none finished). "
        f"Time to target: the first logged point where {target_key} ≥ {target:g}, mapped to epochs, updates and "
        f"training seconds by interpolating the progress/* metrics on the examples-seen axis; mean ± std over "
        f"the seeds that reached it."
    )
    return f"{header}\n\n" + table(cols, lines) + f"\n\n{notes}\n\n![convergence](convergence.png)\n"


def make_report(
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "descent",
    out_dir=None,
    target_acc: float = TARGET_ACC,
) -> dict:
    """Write convergence.{png,md,csv} and, when the runs belong to a sweep, log them to its parent run
    under report/; for an Optuna study also search.{png,md}. Returns {"png", "md", "csv"[, "search_png",
    "search_md"]} -> path."""
    client = skeleton.client(tracking_uri)
    parent, runs = select_runs(client, parent_run_id, experiment)
    by, configs = group(runs)
    source = "val" if any(names.VAL_ACC in r.history for r in runs) else "train"
    rows = [summarize(c, names.VAL_ACC if source == "val" else names.TRAIN_ACC, target_acc) for c in configs]
    tables = {"convergence": rows}

    if parent:
        what = f"Sweep `{parent.info.run_name}` (run `{parent.info.run_id}`)"
        where = f" ({shown(skeleton.sweep_dir(parent))})" if skeleton.sweep_dir(parent) else ""
    else:
        what, where = f"All runs of experiment `{experiment}` (no sweep found)", ""
    grouped = ", ".join(by) if by else "nothing varies"
    header = (
        f"# Convergence report\n\n{what}{where}: {len(runs)} runs in {len(configs)} configurations "
        f"(grouped by {grouped}); target {source}/acc ≥ {target_acc:g}."
    )

    out = skeleton.folder(out_dir, parent)
    # the figure names the sweep and its run, never a folder: a title travels (docs, a report shared) where
    # this machine's paths mean nothing; the title is also the PNG's Title, which tests and docs read back
    title = what.replace("`", "") + f" — {len(runs)} runs, {len(configs)} configurations"
    paths = skeleton.write(out, "convergence", plot(configs, source, title), markdown(rows, header), rows, title)
    if parent and names.STUDY in parent.data.tags:  # an Optuna study: its search, beside the curves
        searched, search_rows = make_search(client, parent, runs, by, out, what)
        paths |= searched
        if search_rows:
            tables["search"] = search_rows
    if parent:
        skeleton.to_parent(client, parent.info.run_id, paths)
        for name, found in tables.items():  # the tables above, as MLflow tables (the run's artifacts show them)
            log_table(client, parent.info.run_id, pd.DataFrame(found), f"{skeleton.ARTIFACTS}/{name}.json")
    return paths

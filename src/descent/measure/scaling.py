"""Where a bigger batch stops paying: the batch-size scaling report of experiment=batch_scaling.

McCandlish et al. 2018 (arXiv:1812.06162): with the best learning rate at each batch size B, the updates S
and examples E = B·S to reach a target trade off as (S/S_min − 1)(E/E_min − 1) = 1, i.e. S(B) = S_min + E_min/B.
Below B_crit = E_min/S_min doubling the batch nearly halves the updates (perfect scaling); above it, it
nearly doubles the examples. A point here is, per (optimizer, B), the trial of that cell's learning-rate
study that reached sweep.target_acc in the fewest updates (Shallue et al. 2019's "best trial").

Reads MLflow only (no torch): the sweep's children carry target/updates, target/examples (descent/sweep.py,
Target) and noise/b_simple (descent/measure/noise.py).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from descent.store import PARENT_TAG, SWEEP_DIR_TAG, SWEEP_TAG, resolve_uri

BOOTSTRAP = 1000  # resamples of each cell's trials for the intervals


@dataclass
class Trial:
    optimizer: str
    batch_size: int
    lr: float
    status: str
    updates: float | None   # target/updates: None when the run missed the target
    examples: float | None
    b_simple: float | None  # noise/b_simple at the target's validation point


def batch_size_of(params: dict[str, str]) -> int:
    """data.batch_size as run: null means the whole training set (after val_size and limit_train): the run's
    data.train_examples, or for runs recorded before it the table's training split (descent/datasets.py)."""
    from descent.datasets import TABLE

    b = params.get("data.batch_size", "None")
    if b not in ("None", "null", ""):
        return int(b)
    if params.get("data.train_examples"):
        return int(params["data.train_examples"])
    n = TABLE.get(params.get("data.name", ""), TABLE["MNIST"]).n_train - int(params.get("data.val_size", 0) or 0)
    limit = params.get("data.limit_train", "None")
    return min(n, int(limit)) if limit not in ("None", "null", "") else n


def read_trials(client, parent_run_id: str) -> list[Trial]:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)
    trials = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        updates, examples = m.get("target/updates"), m.get("target/examples")
        b_simple = None
        if examples is not None and "noise/b_simple" in m:
            at = [x.value for x in client.get_metric_history(r.info.run_id, "noise/b_simple") if x.step == examples]
            b_simple = at[-1] if at else None
        trials.append(Trial(p.get("optimizer", "?"), batch_size_of(p), float(p.get("optimizer.lr", "nan")),
                            r.info.status, updates, examples, b_simple))
    return trials


def best(trials: list[Trial]) -> Trial | None:
    """The trial that reached the target in the fewest updates."""
    reached = [t for t in trials if t.updates is not None]
    return min(reached, key=lambda t: t.updates) if reached else None


def fit(batch_sizes, updates) -> tuple[float, float]:
    """(S_min, E_min) of S(B) = S_min + E_min/B: least squares on relative residuals (S spans decades: each
    point counts by its ratio to the fit, not its absolute updates), both >= 0 (NNLS). NaN for < 2 sizes."""
    from scipy.optimize import nnls

    b, s = np.asarray(batch_sizes, float), np.asarray(updates, float)
    if len(set(b)) < 2:
        return float("nan"), float("nan")
    a = np.stack([np.ones_like(b), 1 / b], 1) / s[:, None]
    (s_min, e_min), _ = nnls(a, np.ones_like(s))
    return float(s_min), float(e_min)


def b_crit(s_min: float, e_min: float) -> float:
    return e_min / s_min if s_min > 0 else float("inf") if e_min > 0 else float("nan")


def bootstrap(cells: dict[int, list[Trial]], rng: np.random.Generator, n: int = BOOTSTRAP) -> np.ndarray:
    """B_crit over resamples of each cell's trials (with replacement): how much it owes to which trials
    the learning-rate search happened to draw. Not an interval over seeds (one seed per trial)."""
    out = []
    for _ in range(n):
        points = []
        for b, trials in cells.items():
            pick = best([trials[i] for i in rng.integers(0, len(trials), len(trials))])
            if pick is not None:
                points.append((b, pick.updates))
        if len({b for b, _ in points}) >= 2:
            out.append(b_crit(*fit(*zip(*points))))
    return np.array(out)


def analyse(trials: list[Trial], seed: int = 0) -> tuple[list[dict], dict[str, dict]]:
    """(one row per optimizer and batch size, the fit per optimizer)."""
    rng = np.random.default_rng(seed)
    rows, fits = [], {}
    for opt in dict.fromkeys(t.optimizer for t in trials):
        cells: dict[int, list[Trial]] = {}
        for t in trials:
            if t.optimizer == opt:
                cells.setdefault(t.batch_size, []).append(t)
        points = []
        for b in sorted(cells):
            top = best(cells[b])
            rows.append({"optimizer": opt, "batch_size": b, "trials": len(cells[b]),
                         "reached": sum(t.updates is not None for t in cells[b]),
                         "best_lr": top.lr if top else None, "updates_to_target": top.updates if top else None,
                         "examples_to_target": top.examples if top else None,
                         "b_simple_at_target": top.b_simple if top else None})
            if top:
                points.append((b, top.updates))
        s_min, e_min = fit(*zip(*points)) if points else (float("nan"), float("nan"))
        boot = bootstrap(cells, rng)
        finite = boot[np.isfinite(boot)]
        lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (float("nan"),) * 2)
        simple = [r["b_simple_at_target"] for r in rows if r["optimizer"] == opt and r["b_simple_at_target"]]
        fits[opt] = {"s_min": s_min, "e_min": e_min, "b_crit": b_crit(s_min, e_min), "b_crit_low": float(lo),
                     "b_crit_high": float(hi), "bootstrap_finite": f"{len(finite)}/{len(boot)}",
                     "b_simple": float(np.median(simple)) if simple else float("nan"), "points": len(points)}
    return rows, fits


# ---------------------------------------------------------------------------------------------

def plot(rows: list[dict], fits: dict[str, dict], title: str):
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5.5), layout="constrained")
    ax_s, ax_e, ax_lr = fig.subplots(1, 3)
    palette = colormaps["tab10"]
    for i, (opt, f) in enumerate(fits.items()):
        color = palette(i)
        pts = [r for r in rows if r["optimizer"] == opt and r["updates_to_target"] is not None]
        missed = [r for r in rows if r["optimizer"] == opt and r["updates_to_target"] is None]
        b = np.array([r["batch_size"] for r in pts], float)
        s = np.array([r["updates_to_target"] for r in pts], float)
        label = f"{opt}: B_crit {f['b_crit']:.3g}" if math.isfinite(f["b_crit"]) else f"{opt}: no finite B_crit"
        ax_s.plot(b, s, "o", color=color, label=label)
        for r in missed:  # cells where no trial reached the target: marked on the bottom edge
            ax_s.plot([r["batch_size"]], [0.02], "v", color=color, transform=ax_s.get_xaxis_transform(), clip_on=False)
        ax_e.plot(s, b * s, "o", color=color, label=opt)
        if len(pts):
            ax_s.plot(b, s[0] * b[0] / b, ":", color=color, lw=1)  # perfect scaling from the smallest batch
        if math.isfinite(f["s_min"]) and len(pts):
            grid = np.geomspace(min(b.min(), 1), max(b.max(), 2), 200)
            fit_s = f["s_min"] + f["e_min"] / grid
            ax_s.plot(grid, fit_s, "-", color=color, lw=1.4)
            ax_e.plot(fit_s, grid * fit_s, "-", color=color, lw=1.4)
            if math.isfinite(f["b_crit"]) and f["b_crit"] > 0:
                ax_s.axvline(f["b_crit"], color=color, ls="--", lw=0.8)
        lrs = [(r["batch_size"], r["best_lr"]) for r in pts]
        if lrs:
            lb, lv = np.array(lrs, float).T
            ax_lr.plot(lb, lv, "o-", color=color, label=opt)
            ax_lr.plot(lb, lv[0] * lb / lb[0], "--", color=color, lw=0.8, alpha=0.7)
            ax_lr.plot(lb, lv[0] * np.sqrt(lb / lb[0]), ":", color=color, lw=0.8, alpha=0.7)
    for ax in (ax_s, ax_e, ax_lr):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    ax_s.set(xlabel="batch size B", ylabel="updates to target S",
             title="updates to target: dots = best trial, line = S_min + E_min/B,\n"
                   "dotted = perfect scaling, dashed = B_crit, ▼ = no trial reached it")
    ax_e.set(xlabel="updates to target S", ylabel="examples to target E = B·S",
             title="the trade-off: (S/S_min − 1)(E/E_min − 1) = 1")
    ax_lr.set(xlabel="batch size B", ylabel="best learning rate",
              title="best lr (of the trials drawn) against B;\ndashed: linear rule, dotted: square-root rule")
    for ax in (ax_s, ax_e, ax_lr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _g(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def markdown(rows: list[dict], fits: dict[str, dict], header: str) -> str:
    lines = [header, "", "| optimizer | B | trials reached / run | best lr | updates to target | examples to target | "
             "noise/b_simple at target |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['batch_size']} | {r['reached']}/{r['trials']} | {_g(r['best_lr'])} | "
                     f"{_g(r['updates_to_target'])} | {_g(r['examples_to_target'])} | {_g(r['b_simple_at_target'])} |")
    lines += ["", "| optimizer | points | S_min | E_min | B_crit = E_min/S_min | 95 % bootstrap over trials | "
              "B_simple (median at target) |", "|---|---|---|---|---|---|---|"]
    for opt, f in fits.items():
        lines.append(f"| {opt} | {f['points']} | {_g(f['s_min'])} | {_g(f['e_min'])} | {_g(f['b_crit'])} | "
                     f"{_g(f['b_crit_low'])} – {_g(f['b_crit_high'])} ({f['bootstrap_finite']} finite) | "
                     f"{_g(f['b_simple'])} |")
    lines += ["", "A point is the cell's trial that reached the target in the fewest updates. The fit: least squares "
              "on relative residuals of S(B) = S_min + E_min/B with S_min, E_min >= 0, over the points that reached "
              f"the target. Interval: {BOOTSTRAP} resamples of each cell's trials with replacement (the "
              "learning-rate search's luck; one seed, so not seed-to-seed variation; a trial pruned once it had "
              "spent the cell's best count counts as missing the target there, so a resample without the best "
              "drops the cell rather than taking a slower point). B_simple: the gradient noise "
              "scale measured by the best runs at their target point (median over batch sizes).", "",
              "![scaling](scaling.png)", ""]
    return "\n".join(lines)


def write_csv(rows: list[dict], fits: dict[str, dict], path: Path) -> None:
    fields = list(rows[0]) + [f"fit_{k}" for k in next(iter(fits.values()))] if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in rows:
            row = r | {f"fit_{k}": v for k, v in fits[r["optimizer"]].items()}
            writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for k, v in row.items()})


def latest_sweep(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    sweeps = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = 'true'",
                                order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not sweeps:
        from descent.report import ReportError

        raise ReportError(f"no sweep in experiment {experiment!r} of {client.tracking_uri}")
    return sweeps[0].info.run_id


def make_scaling_report(tracking_uri: str | None = None, parent_run_id: str | None = None,
                        out_dir: str | Path | None = None, experiment: str = "batch_scaling",
                        more_parents: tuple[str, ...] = ()) -> dict:
    """scaling.{png,md,csv} in out_dir (default: the sweep's folder) and under the parent's report/, the fit's
    numbers as the parent's metrics scaling.<what>.<optimizer>. more_parents: other sweeps whose trials join
    these (another study's parent: learning rates beyond a study's categorical grid need a study of their own).
    Returns the paths and a summary line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from descent.report import ReportError, default_out, launch_relative

    client = MlflowClient(resolve_uri(tracking_uri))
    parent_run_id = parent_run_id or latest_sweep(client, experiment)
    parent = client.get_run(parent_run_id)
    trials = read_trials(client, parent_run_id)
    for other in more_parents:
        try:
            trials += read_trials(client, other)
        except MlflowException as e:
            raise ReportError(f"--with {other}: no such sweep run in {client.tracking_uri} ({e.error_code})") from None
    if not trials:
        raise ReportError(f"no runs under sweep run {parent_run_id}")
    rows, fits = analyse(trials)
    out = (Path(out_dir) if out_dir is not None else default_out(parent)).absolute()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "scaling.png", "md": out / "scaling.md", "csv": out / "scaling.csv"}
    where = launch_relative(parent.data.tags[SWEEP_DIR_TAG]) if parent.data.tags.get(SWEEP_DIR_TAG) else ""
    what = f"sweep `{parent.info.run_name}` (run `{parent_run_id}`) {where}".strip()
    if more_parents:
        what += " with the trials of " + ", ".join(f"`{p}`" for p in more_parents)
    header = (f"# Batch-size scaling report\n\n{what}: {len(trials)} runs, "
              f"{len({(t.optimizer, t.batch_size) for t in trials})} (optimizer, batch size) cells; "
              f"{sum(t.updates is not None for t in trials)} reached the target.")
    title = f"sweep {parent.info.run_name} (run {parent_run_id})" + (  # no folder in a figure: as report.py
        " with the trials of " + ", ".join(more_parents) if more_parents else "")
    plot(rows, fits, title).savefig(paths["png"], dpi=100, metadata={"Title": title})
    paths["md"].write_text(markdown(rows, fits, header))
    write_csv(rows, fits, paths["csv"])
    for opt, f in fits.items():
        for key in ("b_crit", "s_min", "e_min", "b_crit_low", "b_crit_high", "b_simple"):
            if math.isfinite(f[key]):
                client.log_metric(parent_run_id, f"scaling.{key}.{opt}", f[key])
    for path in paths.values():
        client.log_artifact(parent_run_id, str(path), "report")
    paths["summary"] = "; ".join(f"{opt}: B_crit {_g(f['b_crit'])} [{_g(f['b_crit_low'])}, {_g(f['b_crit_high'])}], "
                                 f"B_simple {_g(f['b_simple'])}" for opt, f in fits.items())
    return paths

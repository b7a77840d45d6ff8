"""Where a bigger batch stops paying: the batch-size scaling report of experiment=batch_scaling.

McCandlish et al. 2018 (arXiv:1812.06162): with the best learning rate at each batch size B, the updates S
and examples E to reach a target trade off as (S/S_min − 1)(E/E_min − 1) = 1, i.e. S(B) = S_min + E_min/B.
Below B_crit = E_min/S_min doubling the batch nearly halves the updates (perfect scaling); above it, it
nearly doubles the examples.

A point here is, per (optimizer, B, target), the median over seeds of the updates to that target at the rate
chosen for it on the first seed (descent/sweep/protocol.py: the rate with the fewest updates among the first seed's
trials; then that rate on every seed). Its interval: a bootstrap over seeds (each cell's seeds resampled with
replacement, the medians refitted). Runs recorded before several targets and seeds (one target, one seed)
give points of one seed, which the bootstrap cannot vary.

Reads MLflow only (no torch): the sweep's children carry target/updates/<acc>, target/examples/<acc>
(descent/sweep/job.py, Target), and the reference run noise/b_simple/<acc>, noise/b_simple_se/<acc>
(descent/measure/noise.py, NoiseAtTargets) and where measured noise/b_noise/<acc>, noise/b_precond/<acc> with
their errors (descent/measure/curvature_noise.py). With adamw and a Muon optimizer in one study, the report adds
per B and target S_adamw/S_muon, which at one B is also E_adamw/E_muon (E = S B), with a bootstrap over seeds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from scipy.optimize import nnls

from descent.console.terminal import shown
from descent.data.datasets import TABLE, val_examples
from descent.engine import cadence
from descent.reports import skeleton
from descent.reports.skeleton import ReportError
from descent.tracking import names

BOOTSTRAP = 1000  # resamples of the seeds for the intervals
UPDATES, EXAMPLES = names.TARGET_UPDATES + "/", names.TARGET_EXAMPLES + "/"  # + the target: names.target_key
B_SIMPLE = names.NOISE_B_SIMPLE + "/"  # + the target: names.noise_at_key


@dataclass
class Run:
    optimizer: str
    batch_size: int
    lr: float
    seed: int
    status: str
    updates: dict[float, float] = field(default_factory=dict)  # target acc -> updates at its first crossing
    examples: dict[float, float] = field(default_factory=dict)  # ... examples actually trained on by then
    val_every: int | None = None  # trainer.val_every_examples: how finely a crossing is resolved
    val_share: float | None = None  # trainer.val_every_share: the gap grown to this share of the examples seen
    reference: bool = False  # the reference trajectory (trainer.noise_at_targets): not a cell's trial
    noise: dict[float, tuple[float, float]] = field(default_factory=dict)  # acc -> (B_simple, its error)
    scales: dict[tuple[str, float], tuple[float, float]] = field(default_factory=dict)  # (b_noise | b_precond,
    # acc) -> (value, its error)


SCALES = ("b_noise", "b_precond")  # the noise scales beside B_simple (descent/measure/curvature_noise.py)


def batch_size_of(params: dict[str, str]) -> int:
    """data.batch_size as run: null means the whole training set (after val_size and limit_train): the run's
    data.train_examples, or for runs recorded before it the table's training split (descent/data/datasets.py)."""
    b = params.get("data.batch_size", "None")
    if b not in ("None", "null", ""):
        return int(b)
    if params.get(names.TRAIN_EXAMPLES):
        return int(params[names.TRAIN_EXAMPLES])
    n_train = TABLE.get(params.get("data.name", ""), TABLE["MNIST"]).n_train
    val = str(params.get("data.val_size", "0") or "0")  # a count, or a fraction of the training set
    n = n_train - val_examples(float(val) if any(c in val for c in ".eE") else int(val), n_train)
    limit = params.get("data.limit_train", "None")
    return min(n, int(limit)) if limit not in ("None", "null", "") else n


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_runs(client, parent_run_id: str) -> list[Run]:
    found = skeleton.children(client, client.get_run(parent_run_id))
    runs = []
    for r in found:
        p, m = r.data.params, r.data.metrics
        run = Run(
            p.get("optimizer", "?"),
            batch_size_of(p),
            float(p.get("optimizer.lr", "nan")),
            _int(p.get("seed")) or 0,
            r.info.status,
            val_every=_int(p.get("trainer.val_every_examples")),
            val_share=_float(p.get("trainer.val_every_share")),
            reference=p.get("trainer.noise_at_targets") == "True",
        )
        for key, value in m.items():
            if key.startswith(UPDATES):
                run.updates[float(key[len(UPDATES) :])] = value
            elif key.startswith(EXAMPLES):
                run.examples[float(key[len(EXAMPLES) :])] = value
            elif key.startswith(B_SIMPLE):
                acc = float(key[len(B_SIMPLE) :])
                run.noise[acc] = (value, m.get(names.noise_at_key("b_simple_se", acc), float("nan")))
            elif key.count("/") == 2 and key.split("/")[1] in SCALES:
                _, name, acc = key.split("/")
                run.scales[name, float(acc)] = (
                    value,
                    m.get(names.noise_at_key(f"{name}_se", float(acc)), float("nan")),
                )
        acc = p.get("sweep.target_acc")  # runs recorded before several targets: their one target
        if names.TARGET_UPDATES in m and acc is not None and float(acc) not in run.updates:
            run.updates[float(acc)] = m[names.TARGET_UPDATES]
            run.examples[float(acc)] = m.get(names.TARGET_EXAMPLES, float("nan"))
        runs.append(run)
    return runs


def same(a: float, b: float) -> bool:
    return abs(math.log(a) - math.log(b)) < 1e-6 if a > 0 and b > 0 else a == b


TRIAL_FIELDS = ("optimizer", "batch_size", "lr", "seed", "status", "reference", "val_every", "val_share")


def trial_rows(runs: list[Run]) -> list[dict]:
    """Every trial as one flat row (scaling_trials.csv): its cell, rate, seed and state, then per target
    updates@<acc>, examples@<acc> and the reference run's b_simple@<acc>, b_simple_se@<acc>, b_noise@<acc>, ...
    What the report is computed from: read_trials() reads it back, so a study's report can be redrawn, or joined
    to another store's trials, without the MLflow store it ran in."""
    rows = []
    for r in runs:
        row = {k: getattr(r, k) for k in TRIAL_FIELDS}
        for acc in sorted(r.updates):
            row[f"updates@{acc:g}"] = r.updates[acc]
            row[f"examples@{acc:g}"] = r.examples.get(acc)
        for acc, (value, se) in sorted(r.noise.items()):
            row[f"b_simple@{acc:g}"], row[f"b_simple_se@{acc:g}"] = value, se
        for (name, acc), (value, se) in sorted(r.scales.items()):
            row[f"{name}@{acc:g}"], row[f"{name}_se@{acc:g}"] = value, se
        rows.append(row)
    return rows


def read_trials(path: str | Path) -> list[Run]:
    """The trials of a scaling_trials.csv (trial_rows). A missing file, a missing column or a value that is not
    a number: ReportError naming the file, the row and the column."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
    except OSError as e:
        raise ReportError(f"--trials {shown(path)}: {e.strerror}") from None
    if not table:
        raise ReportError(f"--trials {shown(path)}: no trials in it (a header at most)")
    missing = [k for k in TRIAL_FIELDS if k not in table[0]]
    if missing:
        raise ReportError(
            f"--trials {shown(path)}: no column {', '.join(missing)}; a scaling_trials.csv (written by "
            "compare.py --scaling) has " + ", ".join(TRIAL_FIELDS) + " and per target updates@<acc>, examples@<acc>"
        )
    runs = []
    for line, row in enumerate(table, start=2):

        def number(key, kind=float):
            value = row[key]
            if value in ("", None):
                return float("nan") if kind is float else None
            try:
                return kind(float(value)) if kind is int else kind(value)
            except ValueError:
                raise ReportError(f"--trials {shown(path)}, line {line}: {key}={value!r} is not a number") from None

        run = Run(
            row["optimizer"],
            number("batch_size", int),
            number("lr"),
            number("seed", int) or 0,
            row["status"],
            val_every=number("val_every", int),
            val_share=number("val_share"),
            reference=row["reference"] == "True",
        )
        for key in row:
            if "@" not in key or row[key] in ("", None):
                continue
            what, acc = key.split("@", 1)
            try:
                acc = float(acc)
            except ValueError:
                raise ReportError(f"--trials {shown(path)}: column {key!r} has no target after @") from None
            if what == "updates":
                run.updates[acc] = number(key)
                run.examples[acc] = number(f"examples@{acc:g}") if f"examples@{acc:g}" in row else float("nan")
            elif what == "b_simple":
                run.noise[acc] = (number(key), number(f"b_simple_se@{acc:g}"))
            elif what in SCALES:
                run.scales[what, acc] = (number(key), number(f"{what}_se@{acc:g}"))
        runs.append(run)
    return runs


def by_seed(row: dict) -> list[float]:
    """A row's updates to its target, one per seed that reached it (the table's "by seed" column)."""
    return [float(v) for v in row["updates_by_seed"].split()]


def fit(batch_sizes, updates) -> tuple[float, float]:
    """(S_min, E_min) of S(B) = S_min + E_min/B: least squares on relative residuals (S spans decades: each
    point counts by its ratio to the fit, not its absolute updates), both >= 0 (NNLS). NaN for < 2 sizes."""
    b, s = np.asarray(batch_sizes, float), np.asarray(updates, float)
    if len(set(b)) < 2:
        return float("nan"), float("nan")
    a = np.stack([np.ones_like(b), 1 / b], 1) / s[:, None]
    (s_min, e_min), _ = nnls(a, np.ones_like(s))
    return float(s_min), float(e_min)


def b_crit(s_min: float, e_min: float) -> float:
    """E_min/S_min; inf when the fit puts S_min at 0 (NNLS's bound: no B where more examples stop paying)."""
    return e_min / s_min if s_min > 1e-9 * max(e_min, 1.0) else float("inf") if e_min > 0 else float("nan")


def bootstrap(cells: dict[int, list[float]], rng: np.random.Generator, n: int = BOOTSTRAP) -> np.ndarray:
    """(S_min, E_min, B_crit) of fits to resampled points: each cell's seeds drawn with replacement, their median
    the point. An interval over seeds (how much a point owes to which seeds ran), not over learning rates."""
    sizes = sorted(cells)
    values = [np.asarray(cells[b], float) for b in sizes]
    out = np.empty((n, 3))
    for i in range(n):
        points = [float(np.median(v[rng.integers(0, len(v), len(v))])) for v in values]
        s_min, e_min = fit(sizes, points)
        out[i] = s_min, e_min, b_crit(s_min, e_min)
    return out


def interval(samples: np.ndarray) -> tuple[float, float, str]:
    finite = samples[np.isfinite(samples)]
    lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (float("nan"),) * 2
    return float(lo), float(hi), f"{len(finite)}/{len(samples)}"


def point(runs: list[Run], acc: float) -> dict | None:
    """One cell at one target: the first seed's best rate, then every seed at that rate."""
    first = min(r.seed for r in runs)
    tried = sorted((r.updates[acc], r.lr) for r in runs if r.seed == first and acc in r.updates)
    if not tried:
        return None
    lr = tried[0][1]
    at_rate = {}
    # one run per seed at that rate (a sweep joined twice counts once; a run interrupted and run again: the one
    # that went furthest)
    for r in sorted(runs, key=lambda r: (r.status != "FINISHED", -len(r.updates))):
        if same(r.lr, lr):
            at_rate.setdefault(r.seed, r)
    reached = [r for r in at_rate.values() if acc in r.updates]
    s = [r.updates[acc] for r in reached]
    e = [r.examples.get(acc, float("nan")) for r in reached]
    every = [(r.val_every, r.val_share) for r in reached if r.val_every]
    b = runs[0].batch_size
    # updates between the two checks of the target around the crossing (the gap there, at least one update)
    step = max(1.0, cadence.gap(float(np.median(s)) * b, *every[0]) / b) if every else float("nan")
    return {
        "lr": lr,
        "seeds": sorted(at_rate),
        "reached": len(reached),
        "updates": s,
        "s": float(np.median(s)),
        "e": float(np.median(e)),
        "resolution": step / float(np.median(s)),
        "search_trials": sum(r.seed == first for r in runs),
    }


def analyse(runs: list[Run], seed: int = 0, n_boot: int = BOOTSTRAP) -> tuple[list[dict], dict, dict]:
    """(one row per optimizer, batch size and target; the fit per (optimizer, target); B_simple of the reference
    runs per (optimizer, target))."""
    rng = np.random.default_rng(seed)
    rows, fits, noise = [], {}, {}
    trials = [r for r in runs if not r.reference]
    for opt in dict.fromkeys(r.optimizer for r in runs):
        mine = [r for r in trials if r.optimizer == opt]
        cells: dict[int, list[Run]] = {}
        for r in mine:
            cells.setdefault(r.batch_size, []).append(r)
        accs = sorted({a for r in mine for a in r.updates})
        for acc in accs:
            seeds_s = {}
            points = {b: point(cells[b], acc) for b in sorted(cells)}
            # a cell measured on fewer seeds than the others (its protocol has not finished: the search still
            # running, or seeds still to come) is shown but left out of the fit
            full = max((len(p["seeds"]) for p in points.values() if p), default=0)
            for b, p in points.items():
                in_fit = bool(p) and len(p["seeds"]) == full and p["reached"] == full
                rows.append(
                    {
                        "optimizer": opt,
                        "batch_size": b,
                        "target": acc,
                        "trials": len(cells[b]),
                        "best_lr": p["lr"] if p else None,
                        "seeds": len(p["seeds"]) if p else 0,
                        "seeds_reached": p["reached"] if p else 0,
                        "updates_to_target": p["s"] if p else None,
                        "updates_by_seed": " ".join(f"{v:g}" for v in p["updates"]) if p else "",
                        "examples_to_target": p["e"] if p else None,
                        "resolution": p["resolution"] if p else None,
                        "in_fit": in_fit,
                    }
                )
                if in_fit:
                    seeds_s[b] = p["updates"]
            s_min, e_min = (
                fit(list(seeds_s), [float(np.median(v)) for v in seeds_s.values()]) if seeds_s else (float("nan"),) * 2
            )
            boot = bootstrap(seeds_s, rng, n_boot) if len(seeds_s) >= 2 else np.full((1, 3), np.nan)
            (s_lo, s_hi, _), (e_lo, e_hi, _), (lo, hi, finite) = (interval(boot[:, i]) for i in range(3))
            fits[opt, acc] = {
                "s_min": s_min,
                "e_min": e_min,
                "b_crit": b_crit(s_min, e_min),
                "b_crit_low": lo,
                "b_crit_high": hi,
                "s_min_low": s_lo,
                "s_min_high": s_hi,
                "e_min_low": e_lo,
                "e_min_high": e_hi,
                "bootstrap_finite": finite,
                "points": len(seeds_s),
                "seeds_per_point": max((len(v) for v in seeds_s.values()), default=0),
            }
        for r in runs:
            if r.reference and r.optimizer == opt:
                for acc, (value, se) in r.noise.items():
                    noise[opt, acc] = {"b_simple": value, "b_simple_se": se, "batch_size": r.batch_size, "lr": r.lr}
                for (name, acc), (value, se) in r.scales.items():
                    noise.setdefault((opt, acc), {"batch_size": r.batch_size, "lr": r.lr}).update(
                        {name: value, f"{name}_se": se}
                    )
    return rows, fits, noise


def muon_pair(optimizers) -> tuple[str, str] | None:
    """(adamw, the Muon option) when a study ran both: Essential AI's comparison."""
    muons = [o for o in optimizers if o.startswith("muon")]
    return ("adamw", muons[0]) if "adamw" in optimizers and muons else None


def ratios(rows: list[dict], seed: int = 0, n_boot: int = BOOTSTRAP) -> list[dict]:
    """Per B and target, S_adamw/S_muon (the ratio of the seeds' medians; at one B also E_adamw/E_muon) with
    a 95 % bootstrap over each cell's seeds. Empty without both optimizers."""
    pair = muon_pair(list(dict.fromkeys(r["optimizer"] for r in rows)))
    if pair is None:
        return []
    rng = np.random.default_rng(seed)
    by = {(r["optimizer"], r["batch_size"], r["target"]): r for r in rows if r["updates_by_seed"]}
    out = []
    for (opt, b, acc), r in by.items():
        other = by.get((pair[1], b, acc))
        if opt != pair[0] or other is None:
            continue
        a, m = (np.array(by_seed(x)) for x in (r, other))
        boot = [
            np.median(a[rng.integers(0, len(a), len(a))]) / np.median(m[rng.integers(0, len(m), len(m))])
            for _ in range(n_boot)
        ]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out.append(
            {
                "batch_size": b,
                "target": acc,
                "ratio": float(np.median(a) / np.median(m)),
                "low": float(lo),
                "high": float(hi),
                "seeds": (len(a), len(m)),
                "pair": pair,
            }
        )
    return sorted(out, key=lambda x: (x["target"], x["batch_size"]))


def _g(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def make_scaling_report(
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    out_dir: str | Path | None = None,
    experiment: str = "batch_scaling",
    more_parents: tuple[str, ...] = (),
    trial_files: tuple[str | Path, ...] = (),
) -> dict:
    """scaling.{png,md,csv} and scaling_trials.csv (every trial, trial_rows) in out_dir (default: the sweep's
    folder) and under the parent's report/, the fit's numbers as the parent's metrics scaling.<what>.<optimizer>.
    more_parents: other sweeps whose trials join these (another study's parent: learning rates beyond a study's
    categorical grid need a study of their own). trial_files: scaling_trials.csv files whose trials join these;
    with no parent_run_id the report is of those files alone (no store is opened, nothing logged).
    Returns the paths and a summary line."""
    trials, sources = [], []
    for path in trial_files:
        trials += read_trials(path)
        sources.append(shown(Path(path)))
    client = parent = None
    if parent_run_id is not None or not trial_files:
        client = skeleton.client(tracking_uri)
        if parent_run_id is None:
            latest = skeleton.latest_sweep(client, experiment)
            if latest is None:
                raise ReportError(f"no sweep in experiment {experiment!r} of {client.tracking_uri}")
            parent_run_id = latest.info.run_id
        parent = client.get_run(parent_run_id)
        trials = read_runs(client, parent_run_id) + trials
    for other in more_parents:
        if client is None:
            raise ReportError("--with joins another sweep's trials to a --parent's: give --parent RUN_ID")
        try:
            trials += read_runs(client, other)
        except MlflowException as e:
            raise ReportError(f"--with {other}: no such sweep run in {client.tracking_uri} ({e.error_code})") from None
    if not trials:
        raise ReportError(
            f"no runs under sweep run {parent_run_id}" if parent else "no trials in " + ", ".join(sources)
        )
    from descent.reports.scaling_render import csv_rows, markdown, plot  # (it imports this module)

    rows, fits, noise = analyse(trials)
    out = skeleton.folder(out_dir, parent)
    what, title = [], []
    if parent is not None:
        where = shown(skeleton.sweep_dir(parent)) if skeleton.sweep_dir(parent) else ""
        what.append(f"sweep `{parent.info.run_name}` (run `{parent_run_id}`) {where}".strip())
        title.append(f"sweep {parent.info.run_name} (run {parent_run_id})")  # no folder in a figure
    if more_parents:
        what.append("the trials of " + ", ".join(f"`{p}`" for p in more_parents))
        title.append("the trials of " + ", ".join(more_parents))
    if sources:
        what.append("the trials in " + ", ".join(f"`{p}`" for p in sources))
        title.append("the trials in " + ", ".join(Path(p).name for p in sources))
    header = (
        f"# Batch-size scaling report\n\n{' with '.join(what)}: {len(trials)} runs, "
        f"{len({(t.optimizer, t.batch_size) for t in trials})} (optimizer, batch size) cells; "
        f"{sum(bool(t.updates) for t in trials)} reached a target."
    )
    title = " with ".join(title)
    paths = skeleton.write(
        out, "scaling", plot(rows, fits, noise, title), markdown(rows, fits, noise, header), csv_rows(rows, fits), title
    )
    paths["trials"] = out / "scaling_trials.csv"
    skeleton.write_csv(trial_rows(trials), paths["trials"])
    summary = (
        "; ".join(
            f"{opt} @ {acc:g}: B_crit {_g(f['b_crit'])} [{_g(f['b_crit_low'])}, {_g(f['b_crit_high'])}]"
            for (opt, acc), f in fits.items()
            if f["points"] >= 2  # a fit needs two batch sizes
        )
        or "no B_crit: no optimizer has a target reached on every seed at two batch sizes (the table ranks them)"
    )
    if client is None:
        return paths | {"summary": summary}
    top = {opt: max(acc for o, acc in fits if o == opt) for opt, _ in fits}
    for (opt, acc), f in fits.items():
        values = dict(f) | (
            {k: v for k, v in noise[opt, acc].items() if k.startswith(("b_simple", *SCALES))}
            if (opt, acc) in noise
            else {}
        )
        for key in (
            "b_crit",
            "s_min",
            "e_min",
            "b_crit_low",
            "b_crit_high",
            "b_simple",
            "b_simple_se",
            *(k + e for k in SCALES for e in ("", "_se")),
        ):
            if key in values and math.isfinite(values[key]):
                client.log_metric(parent_run_id, names.scaling_key(key, opt, acc), values[key])
                if acc == top[opt]:  # the highest target (where the runs stop) under the names without one
                    client.log_metric(parent_run_id, names.scaling_key(key, opt), values[key])
    skeleton.to_parent(client, parent_run_id, paths)
    return paths | {"summary": summary}

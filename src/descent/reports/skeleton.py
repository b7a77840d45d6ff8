"""What every report shares: the runs as read from MLflow, the sweep they belong to, and the report's skeleton
(client -> runs -> folder -> png/md/csv -> the parent run's report/ artifacts).

Reads MLflow and draws with matplotlib's object API, no torch or lightning: a report starts in about a second.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from descent.tracking import names
from descent.tracking.store import resolve_uri

AXES = {"epochs": names.EPOCH, "updates": names.UPDATES, "seconds": names.SECONDS}
FINALS = (names.TRAIN_LOSS, names.TRAIN_ACC, names.VAL_LOSS, names.VAL_ACC, names.TEST_LOSS, names.TEST_ACC)
ARTIFACTS = "report"  # the parent run's folder of report files
LOG_X_RATIO = 10  # log-scale an axis when the extents on it differ by this factor or more


class ReportError(RuntimeError):
    """Nothing to report: no such experiment, run or children."""


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
        return self.tags.get(names.DIVERGED) == "true" or any(
            not np.isfinite(v).all() for k, (_, v) in self.history.items() if k.endswith("/loss")
        )

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
        examples = self.tags.get(names.DIVERGED_EXAMPLES, "")
        return int(examples) if examples.isdigit() else None

    def progress(self, axis: str, steps) -> np.ndarray:
        """Epochs, updates or training seconds at the given steps, interpolated on the examples axis
        (val points need not fall on the steps where progress/* was logged)."""
        s, v = self.history.get(AXES[axis], (np.zeros(0), np.zeros(0)))
        if not len(s) and axis == "updates" and self.diverged_at:
            # diverged before its first log point: train.py's tags still give one point
            s, v = np.array([float(self.diverged_at)]), np.array([float(self.tags[names.DIVERGED_UPDATES])])
        if not len(s):
            return np.full(len(np.atleast_1d(steps)), np.nan)
        if s[0] > 0:  # every counter is 0 before the first example
            s, v = np.r_[0.0, s], np.r_[0.0, v]
        return np.interp(steps, s, v)

    def number(self, key: str, default=None) -> float | None:
        """A param as a number (None, or `default`, when it is unset)."""
        value = self.params.get(key)
        return default if value in (None, "None") else float(value)

    def by_updates(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The metric against optimizer updates: (updates, values) up to its first non-finite value."""
        steps, values = self.curve(key)
        return self.progress("updates", steps), values

    def final(self, key: str) -> float | None:
        values = self.history.get(key, (None, ()))[1]
        return float(values[-1]) if len(values) and np.isfinite(values[-1]) else None


def client(tracking_uri: str | None = None) -> MlflowClient:
    """The store: an explicit URI, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the launch directory."""
    return MlflowClient(resolve_uri(tracking_uri))


def search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, max_results=1000, order_by=["attributes.start_time ASC"], page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def children(client, parent) -> list:
    """A sweep's child runs, in its job order (parallel jobs may start out of order)."""
    found = search(client, [parent.info.experiment_id], f"tags.`{names.PARENT}` = '{parent.info.run_id}'")
    return sorted(found, key=lambda r: int(r.data.tags.get(names.JOB_NUM, 0)))


def history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    last = {m.step: m.value for m in points}  # one value per step: the latest written
    return np.array(list(last), dtype=float), np.array(list(last.values()), dtype=float)


def latest_sweep(client, experiment: str, experiment_id: str | None = None):
    """The experiment's latest sweep's parent run, or None."""
    if experiment_id is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        experiment_id = exp.experiment_id
    sweeps = client.search_runs(
        [experiment_id], f"tags.`{names.SWEEP}` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return sweeps[0] if sweeps else None


def parent_run(client, parent_run_id: str):
    try:
        return client.get_run(parent_run_id)
    except MlflowException as e:
        raise ReportError(f"no run {parent_run_id!r} in {client.tracking_uri}") from e


def select_runs(client, parent_run_id: str | None = None, experiment: str = "descent", metrics=()):
    """(parent run or None, child runs): the parent's children; else the experiment's latest sweep;
    else, in an experiment without sweeps, all its runs. Histories: FINALS, AXES and `metrics`."""
    if parent_run_id:
        parent = parent_run(client, parent_run_id)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"no experiment named {experiment!r} in {client.tracking_uri}")
        parent = latest_sweep(client, experiment, exp.experiment_id)
    found = children(client, parent) if parent else search(client, [exp.experiment_id])
    if not found:
        where = f"sweep run {parent.info.run_id}" if parent else f"experiment {experiment!r}"
        raise ReportError(f"no runs to report in {where}")
    keys = set(FINALS) | set(AXES.values()) | set(metrics)
    runs = [
        Run(
            r.info.run_id,
            r.info.run_name or r.info.run_id[:8],
            r.info.status,
            dict(r.data.params),
            dict(r.data.tags),
            {k: history(client, r.info.run_id, k) for k in r.data.metrics if k in keys},
        )
        for r in found
    ]
    return parent, runs


def sweep_dir(parent) -> str | None:
    """The sweep's folder as recorded on its parent run (this machine's absolute path)."""
    return parent.data.tags.get(names.SWEEP_DIR) if parent else None


def folder(out_dir: str | Path | None, parent) -> Path:
    """Where a report goes: out_dir, else the sweep's folder, else outputs/reports/<timestamp>; made if new."""
    default = Path(sweep_dir(parent) or Path("outputs/reports") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out = (Path(out_dir) if out_dir is not None else default).absolute()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write(
    out: Path, name: str, fig=None, md: str | None = None, rows: list[dict] | None = None, title: str | None = None
) -> dict[str, Path]:
    """<name>.png (the figure, its Title in the PNG's metadata), <name>.md and <name>.csv (rows) in out: those
    given, as {"png", "md", "csv"} -> path."""
    paths = {}
    if fig is not None:
        paths["png"] = out / f"{name}.png"
        fig.savefig(paths["png"], dpi=100, metadata={"Title": title} if title else None)
    if md is not None:
        paths["md"] = out / f"{name}.md"
        paths["md"].write_text(md)
    if rows is not None:
        paths["csv"] = out / f"{name}.csv"
        write_csv(rows, paths["csv"])
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV, every key a column (in order of first appearance); None and NaN as empty cells."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: "" if v is None or (isinstance(v, float) and np.isnan(v)) else v for k, v in row.items()}
            )


def to_parent(client, run_id: str, paths: dict[str, Path]) -> None:
    """The report's files on the sweep's parent run, under report/."""
    for path in paths.values():
        client.log_artifact(run_id, str(path), ARTIFACTS)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def plain_log_ticks(axis) -> None:
    """Ticks as 0.5, 1, 2, 100 rather than 5×10^-1; minor ticks labelled on short axes only."""

    def minor(v, _):
        lo, hi = sorted(axis.get_view_interval())
        mantissa = round(v / 10 ** np.floor(np.log10(v)))
        span = hi / lo if lo > 0 else np.inf
        return f"{v:g}" if span < 4 or (span < 100 and mantissa in (2, 5)) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def metric(x: float) -> str:  # a loss or an accuracy, in a report's table
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"

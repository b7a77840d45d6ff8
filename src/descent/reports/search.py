"""An Optuna study's search, beside its convergence report: the objective trial by trial, the best so far, and
the objective against the searched parameters (search.png), one row per trial (search.md)."""

from __future__ import annotations

import json

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from descent.reports.skeleton import LOG_X_RATIO, Run, history, metric, plain_log_ticks, table, write
from descent.tracking import names


def search_rows(runs: list[Run], objective: str, params: list[str]) -> list[dict]:
    """One row per trial, by study (a grid's cells in order) then trial: its state, parameters, the objective's
    last value (a pruned trial's at its stop) and the training examples it spent."""
    rows = []
    for r in runs:
        if names.TRIAL not in r.tags:
            continue
        steps, values = r.history.get(objective, (np.zeros(0), np.zeros(0)))
        finite = np.isfinite(values)
        state = r.tags.get(names.TRIAL_STATE) or {"FINISHED": "COMPLETE", "RUNNING": "RUNNING"}.get(r.status, "FAIL")
        seen = [s[-1] for s, _ in r.history.values() if len(s)]  # its last point of any metric (steps = examples)
        rows.append(
            {
                "study": r.tags.get(names.STUDY, ""),
                "trial": int(r.tags[names.TRIAL]),
                "state": state,
                "run": r.name,
                **{p: r.params.get(p) for p in params},
                "objective": float(values[finite][-1]) if state != "FAIL" and finite.any() else None,
                "examples": int(max(seen)) if seen else None,
            }
        )
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
                ax.plot(
                    [x],
                    [0.98],
                    "x",
                    color=color[r["study"]] if len(studies) > 1 else "C3",
                    ms=9,
                    mew=2,
                    clip_on=False,
                    transform=ax.get_xaxis_transform(),
                )

    ax = axes[0]
    trial = lambda r: r["trial"]
    marks(ax, trial, complete), marks(ax, trial, pruned, hollow=True), fails(ax, trial)
    for st in studies:
        own = [(r["trial"], np.nan if b is None else b) for r, b in zip(rows, best) if r["study"] == st]
        ax.step(
            *zip(*own),
            where="post",
            color="C1" if len(studies) == 1 else color[st],
            ls="-" if len(studies) == 1 else "--",
        )
    ax.set_xlabel("trial" + (" (of its study)" if len(studies) > 1 else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(objective)
    ax.set_title("the search, trial by trial")

    if space:
        ax = axes[1]
        value = lambda p: lambda r: n[0] if (n := _numbers([r[p]])) is not None else r[p]
        if len(params) == 1:
            marks(ax, value(params[0]), complete), marks(ax, value(params[0]), pruned, hollow=True)
            fails(ax, value(params[0]))
            ax.set_ylabel(objective)
        else:
            points = complete + pruned
            x, y = (_numbers([r[p] for r in points]) for p in params)
            if x is not None and y is not None and points:
                c = ax.scatter(
                    x,
                    y,
                    c=[r["objective"] for r in points],
                    cmap="viridis",
                    edgecolors=["k" if r in complete else "none" for r in points],
                )
                fig.colorbar(c, ax=ax, label=objective)
            for r in failed:
                xy = [_numbers([r[p]]) for p in params]
                if xy[0] is not None and xy[1] is not None:
                    ax.plot(xy[0], xy[1], "x", color="C3", ms=9, mew=2)
            ax.set_ylabel(params[1])
            y_all = _numbers([r[params[1]] for r in rows])
            if y_all is not None and y_all.min() > 0 and y_all.max() / y_all.min() >= LOG_X_RATIO:
                ax.set_yscale("log")
                plain_log_ticks(ax.yaxis)
        x_all = _numbers([r[params[0]] for r in rows])
        if x_all is not None and len(x_all) and x_all.min() > 0 and x_all.max() / x_all.min() >= LOG_X_RATIO:
            ax.set_xscale("log")
            plain_log_ticks(ax.xaxis)
        ax.set_xlabel(params[0])
        ax.set_title(
            "the objective against the searched parameters"
            if len(params) == 2
            else "the objective against the searched parameter"
        )
    if log_y:
        for a in axes[: 1 if len(params) == 2 else None]:
            a.set_yscale("log")
            plain_log_ticks(a.yaxis)
    handles = [
        Line2D(
            [], [], color="gray" if len(studies) > 1 else "C0", ls="", marker="o", label=f"complete ({len(complete)})"
        ),
        Line2D(
            [],
            [],
            color="gray" if len(studies) > 1 else "C0",
            ls="",
            marker="o",
            mfc="none",
            label=f"pruned, at its stop ({len(pruned)})",
        ),
        Line2D(
            [],
            [],
            color="gray" if len(studies) > 1 else "C3",
            ls="",
            marker="x",
            mew=2,
            label=f"failed or diverged ({len(failed)})",
        ),
        Line2D(
            [],
            [],
            color="gray" if len(studies) > 1 else "C1",
            ls="--" if len(studies) > 1 else "-",
            label=f"best so far ({'max' if maximize else 'min'})",
        ),
    ]
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
    summary = (
        "each study's best in bold"
        if grid
        else "best "
        + (
            metric(best[rows[0]["study"]])
            if rows and best[rows[0]["study"]] is not None
            else "none: no trial completed"
        )
    )
    cells = []
    for r in rows:
        value = metric(r["objective"]) if r["objective"] is not None else "–"
        if r["state"] == "COMPLETE" and r["objective"] == best[r["study"]]:
            value = f"**{value}**"
        cells.append(
            [r["study"]] * grid
            + [
                r["trial"],
                r["state"],
                *(r[p] for p in params),
                value,
                r["examples"] if r["examples"] is not None else "–",
                r["run"],
            ]
        )
    header_row = ["study"] * grid + ["trial", "state", *params, objective, "examples", "run"]
    return (
        f"{header}\n\nObjective `{objective}` ({'maximized' if maximize else 'minimized'}); {summary}"
        f"; training examples spent, all trials: {sum(r['examples'] or 0 for r in rows):,}.\n\n"
        + table(header_row, cells)
        + "\n"
    )


def make_search(client, parent, runs: list[Run], by: list[str], out, what: str) -> tuple[dict, list[dict]]:
    """search.{png,md} of the study whose parent run this is: ({"search_png", "search_md"} -> path, its rows);
    nothing when no run is a trial."""
    tags = parent.data.tags
    objective = tags.get(names.STUDY_OBJECTIVE, names.VAL_LOSS)
    maximize = tags.get(names.STUDY_DIRECTION) == "maximize"
    grid = json.loads(tags.get(names.STUDY_GRID, "{}"))  # a grid's keys tell its studies apart
    searched = [b for b in by if b not in grid]
    params = [b for b in searched if _numbers([r.params.get(b) for r in runs]) is not None] or searched
    for r in runs:  # an objective beside the finals (target/updates, ...)
        if objective not in r.history:
            r.history[objective] = history(client, r.id, objective)
    rows = search_rows(runs, objective, params)
    if not rows:
        return {}, rows
    study = tags[names.STUDY]
    fig = plot_search(rows, objective, maximize, params, f"Optuna study {study} — {what.replace('`', '')}")
    md = search_markdown(rows, objective, maximize, params, f"# Search: Optuna study `{study}`\n\n{what}.")
    return {f"search_{k}": v for k, v in write(out, "search", fig, md).items()}, rows

"""The chapter's pictures as a sweep's report: experiment=local_minima, step_size (here) and edge_of_stability
(descent/reports/edge_of_stability.py), and a toy run's own trajectory.png (train.py logs it).

The sweep's callback draws the one its preset names (hydra.callbacks.mlflow_sweep.pictures) beside the
convergence report, from the runs' record only, and logs <name>.png and <name>.md to the parent run under
report/. It draws the toy losses of descent/nets/toy.py with matplotlib's object API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from descent.nets.toy import LOSSES
from descent.reports import edge_of_stability as edge, skeleton
from descent.reports.skeleton import ReportError, Run, select_runs, table
from descent.tracking import names

FLOOR = 1e-8  # f - f* below this is drawn here: the loop's float32 resolves f no finer near the minimum
TOY_METRICS = (*(names.toy_key(c) for c in ("w", "x", "y")), names.TOY_STEP, names.VAL_LOSS)  # histories read


def _start(run: Run) -> list[float]:
    return [float(v) for v in ast.literal_eval(run.params["model.start"])]


def trajectory(start, columns) -> np.ndarray:
    """The start, then the point at each validation point: columns are the coordinates' logged values."""
    n = min(map(len, columns))
    return np.concatenate(
        [np.asarray(start, dtype=float).reshape(1, -1), np.stack([np.asarray(c[:n], dtype=float) for c in columns], 1)]
    )


def _path(run: Run) -> np.ndarray:
    """The run's trajectory, up to a non-finite point."""
    return trajectory(_start(run), [run.curve(names.toy_key(c))[1] for c in LOSSES[run.params["model.loss"]].coords])


def _outcome(run: Run) -> tuple[str, str]:
    """(where it ended: global | local | diverged, in words with how)."""
    loss = run.params["model.loss"]
    if run.diverged:
        at = run.tags.get(names.DIVERGED_UPDATES)
        return "diverged", f"diverged (update {at})" if at else "diverged"
    end = _path(run)[-1]
    where = which_minimum(loss, end)
    gap = float(LOSSES[loss].fn(torch.tensor(end))) - float(LOSSES[loss].fn(torch.tensor(LOSSES[loss].minima[where])))
    steps = run.curve(names.TOY_STEP)[1]
    last = float(np.mean(steps[-10:])) if len(steps) else float("nan")
    if gap < 1e-4:
        return where, f"in the {where} minimum"
    if len(steps) >= 20 and last > 0.5 * float(np.mean(steps[-20:-10])) and last > 1e-3:
        return where, f"oscillating about the {where} minimum (last steps {last:.3g})"
    return where, f"on its way to the {where} minimum (f - f* = {gap:.2g})"


# -- the toy losses drawn: a curve or a surface, the minimum a point flows to, a run's trajectory ----------------


def which_minimum(loss: str, point) -> str:
    """The minimum the gradient flow from `point` ends in (small plain steps, float64): 'global', 'local', or
    'diverged' for a non-finite point."""
    surface = LOSSES[loss]
    p = torch.tensor(np.asarray(point, dtype=np.float64).reshape(-1))
    if not torch.isfinite(p).all():
        return "diverged"
    lr = 0.2 / surface.L
    for _ in range(20000):
        p = p.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(surface.fn(p), p)
        p = p - lr * g
        if g.norm() < 1e-10:
            break
    return min(surface.minima, key=lambda m: float((p.detach() - torch.tensor(surface.minima[m])).norm()))


def draw(ax, loss: str, paths: list[tuple[np.ndarray, str, str]], end_marker: str = "*") -> None:
    """The loss curve (1-D) or the surface's contours (2-D, log-spaced levels) with paths drawn on it.

    paths: (points n x dim, colour, label); the start is a circle, the end `end_marker`.
    """
    surface = LOSSES[loss]
    if surface.dim == 1:
        w = np.linspace(*surface.box[0], 400)
        curve = surface.fn(torch.tensor(w)[:, None]).numpy()
        ax.plot(w, curve, color="0.3", lw=1.5)
        margin = 0.08 * (curve.max() - curve.min())
        ax.set_ylim(curve.min() - margin, curve.max() + margin)  # a diverging path leaves the picture
        for points, color, label in paths:
            w = points[:, 0]
            f = surface.fn(torch.tensor(points)).numpy()
            ax.plot(w, f, "-", color=color, lw=0.8, alpha=0.7, label=label)
            ax.plot(w, f, ".", color=color, ms=3, alpha=0.5)
            ax.plot(w[:1], f[:1], "o", color=color, ms=6)
            ax.plot(w[-1:], f[-1:], end_marker, color=color, ms=11, mec="k", mew=0.5)
        ax.set_xlabel("w")
        ax.set_ylabel("loss f(w)")
        ax.set_xlim(*surface.box[0])
    else:
        (x0, x1), (y0, y1) = surface.box
        x, y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        f = surface.fn(torch.tensor(np.stack([x, y], -1))).numpy()
        ax.contour(x, y, f, levels=np.geomspace(max(f.min(), 1e-3), f.max(), 18), colors="0.6", linewidths=0.7)
        for points, color, label in paths:
            ax.plot(points[:, 0], points[:, 1], "-", color=color, lw=1, alpha=0.8, label=label)
            ax.plot(points[:1, 0], points[:1, 1], "o", color=color, ms=6)
            ax.plot(points[-1:, 0], points[-1:, 1], end_marker, color=color, ms=11, mec="k", mew=0.5)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(surface.coords[0])
        ax.set_ylabel(surface.coords[1])
    for name, point in surface.minima.items():
        at = (point[0], float(surface.fn(torch.tensor(point)))) if surface.dim == 1 else point
        ax.plot(*at, "+", color="k", ms=12, mew=1.5)
        ax.annotate(f"{name} minimum", at, textcoords="offset points", xytext=(0, -16), ha="center", fontsize=8)


def log_trajectory(logger, net) -> None:
    """The run's artifact trajectory.png: its path on the curve or surface, from the record."""
    logger.wait_for_store()  # every point written first: the picture is drawn from the record
    columns = [
        [
            m.value
            for m in sorted(logger.experiment.get_metric_history(logger.run_id, names.toy_key(c)), key=lambda m: m.step)
        ]
        for c in LOSSES[net.loss].coords
    ]
    points = trajectory(net.start, columns)
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    draw(ax, net.loss, [(points, "C0", None)])
    ax.set_title(
        f"{logger.run_name}: {len(points) - 1} points from {net.start} to {', '.join(f'{v:.4g}' for v in points[-1])}",
        fontsize=9,
    )
    logger.experiment.log_figure(logger.run_id, fig, "trajectory.png")


# -- experiment=local_minima ----------------------------------------------------------------------------------


def _arm(run: Run, base_lr: float) -> tuple[float, bool]:
    """(β, control): a momentum run's β, or, for plain SGD at base_lr / (1 - β), that β and True."""
    momentum, lr = run.number("optimizer.momentum", 0.0), run.number("optimizer.lr")
    if momentum == 0 and lr > base_lr * (1 + 1e-9):
        return round(1 - base_lr / lr, 6), True
    return momentum, False


def local_minima(runs: list[Run], title: str):
    """Momentum from the same start on the double well, and its control, plain SGD at lr / (1 - β), with and
    without gradient noise: the paths on the curve, w against updates, and which minimum each run ended in."""
    base_lr = min(r.number("optimizer.lr") for r in runs)  # the momentum arms' lr; a control's is larger
    noises = sorted({r.number("data.noise", 0.0) for r in runs})
    momenta = sorted({_arm(r, base_lr)[0] for r in runs})
    colors = {m: colormaps["viridis"](i / max(1, len(momenta) - 1)) for i, m in enumerate(momenta)}

    def label(r):
        beta, control = _arm(r, base_lr)
        lr = r.number("optimizer.lr")
        return f"plain SGD, lr {lr:.3g} = {base_lr:g}/(1 - {beta:g})" if control else f"momentum {beta:g}, lr {lr:g}"

    fig = Figure(figsize=(20, 4.6 * len(noises)), layout="constrained")
    axes = fig.subplots(len(noises), 3, squeeze=False)
    rows, counts = [], {}
    for row, noise in enumerate(noises):
        chosen = [r for r in runs if r.number("data.noise", 0.0) == noise]
        seeds = sorted({int(r.params.get("seed", 0)) for r in chosen})
        first = {}  # one path per arm on the curve (the lowest seed): more would hide the curve
        for r in sorted(chosen, key=lambda r: int(r.params.get("seed", 0))):
            first.setdefault(_arm(r, base_lr), r)
        for col, control in ((0, False), (1, True)):
            paths = [(_path(r), colors[arm[0]], label(r)) for arm, r in sorted(first.items()) if arm[1] == control]
            draw(axes[row, col], "double_well", paths)
            what = f"plain SGD at lr {base_lr:g}/(1 - β)" if control else f"momentum β at lr {base_lr:g}"
            axes[row, col].set_title(
                f"gradient noise std {noise:g}: {what} (seed {seeds[0]}; o start, * end)", fontsize=10
            )
            if paths:
                axes[row, col].legend(fontsize=7, loc="upper right")
        ax = axes[row, 2]
        for r in chosen:
            beta, control = _arm(r, base_lr)
            x, w = r.by_updates(names.toy_key("w"))
            ax.plot(np.r_[0, x], np.r_[_start(r), w], color=colors[beta], lw=1, alpha=0.8, ls="--" if control else "-")
            where, words = _outcome(r)
            counts.setdefault((noise, control, beta, r.number("optimizer.lr")), []).append(where)
            rows.append(
                [
                    f"{beta:g}",
                    "plain SGD at lr/(1 - β)" if control else "momentum",
                    r.params.get("optimizer.lr"),
                    f"{noise:g}",
                    r.params.get("seed", "0"),
                    f"{w[-1]:.4f}" if len(w) else "—",
                    words,
                    r.name,
                ]
            )
        ax.axhline(-0.2696, color="0.5", ls=":", lw=1)
        ax.text(0, -0.2696, " barrier", va="bottom", fontsize=8, color="0.4")
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel("w")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_title(
            f"gradient noise std {noise:g}: w against updates, {len(seeds)} seed(s); solid momentum, "
            "dashed its control",
            fontsize=10,
        )
    fig.suptitle(title)
    summary = [
        [
            f"{beta:g}",
            "plain SGD" if control else "momentum",
            f"{lr:.4g}",
            f"{noise:g}",
            str(len(ends)),
            f"{ends.count('global')}/{len(ends)}",
            f"{ends.count('local')}/{len(ends)}",
            f"{ends.count('diverged')}/{len(ends)}",
        ]
        for (noise, control, beta, lr), ends in sorted(counts.items())
    ]
    text = (
        "Which minimum each run of the double well ended in: the minimum its final point's gradient flow "
        "reaches (descent.reports.pictures.which_minimum). A momentum run (β at lr η) and its control (plain SGD at "
        "η/(1 - β), the step momentum reaches on a steady slope) share the row's β.\n\n"
        + table(["β", "arm", "lr", "noise std", "runs", "global", "local", "diverged"], summary)
        + "\n\nEach run:\n\n"
        + table(["β", "arm", "lr", "noise std", "seed", "final w", "ended", "run"], rows)
    )
    return fig, text


# -- experiment=step_size -------------------------------------------------------------------------------------

TOLERANCE = 1e-5  # step_size's table: the updates gradient descent takes to f(w) - f* below this


def updates_to(run: Run, f_star: float, tol: float = TOLERANCE) -> int | None:
    """The first update after which f(w) - f* < tol (val/loss is f(w), logged at every update in the preset);
    None if the run never gets there."""
    x, v = run.by_updates(names.VAL_LOSS)
    below = np.flatnonzero(v - f_star < tol)
    return int(round(x[below[0]])) if len(below) else None


def step_size(runs: list[Run], title: str):
    """Learning rates from too small to divergent on each toy loss: paths, loss against updates, the updates
    each rate takes to f - f* < TOLERANCE, and the final loss, against the learning rate with 1/L and 2/L."""
    losses = list(dict.fromkeys(r.params["model.loss"] for r in runs))
    fig = Figure(figsize=(22, 5 * len(losses)), layout="constrained")
    axes = fig.subplots(len(losses), 4, squeeze=False)
    rows, orders = [], []
    for row, loss in enumerate(losses):
        surface = LOSSES[loss]
        f_star = float(surface.fn(torch.tensor(surface.minima["global"])))
        bound = 2 / surface.L
        chosen = sorted([r for r in runs if r.params["model.loss"] == loss], key=lambda r: r.number("optimizer.lr"))
        colors = [colormaps["plasma"](0.9 * i / max(1, len(chosen) - 1)) for i in range(len(chosen))]
        budget = int(max(r.progress("updates", [r.history.get(names.VAL_LOSS, ([0], 0))[0][-1]])[0] for r in chosen))
        paths, finals = [], []
        for r, color in zip(chosen, colors):
            lr = r.number("optimizer.lr")
            label = f"lr {lr:.3g} = {lr / bound:.3g} × 2/L"
            path = _path(r)
            if len(path) > 1:
                paths.append((path, color, label + (" (diverged)" if r.diverged else "")))
            x, v = r.by_updates(names.VAL_LOSS)
            axes[row, 1].plot(x, np.maximum(v - f_star, FLOOR), color=color, lw=1.2, label=label)
            if r.diverged and len(x):
                axes[row, 1].plot(x[-1:], np.maximum(v[-1:] - f_star, FLOOR), "x", color=color, ms=9, mew=2)
            _, words = _outcome(r)
            final = float(v[-1]) - f_star if len(v) and not r.diverged else np.nan
            reached = None if r.diverged else updates_to(r, f_star)
            finals.append((lr, final, reached, r.diverged, color))
            rows.append(
                [
                    loss,
                    f"{lr:.4g}",
                    f"{lr / bound:.3g}",
                    "diverged" if r.diverged else f"not in {budget}" if reached is None else str(reached),
                    words,
                    f"{final:.3g}" if np.isfinite(final) else "—",
                    r.name,
                ]
            )
        # the order of the rates that converge: fewest updates to the tolerance first, then the lowest final loss
        ranked = sorted([f for f in finals if not f[3]], key=lambda f: (f[2] is None, f[2] or 0, f[1]))
        orders.append(
            f"{loss}: "
            + " < ".join(
                f"{lr / bound:.3g}" + (f" ({n})" if n is not None else f" (f - f* = {final:.2g})")
                for lr, final, n, _, _ in ranked
            )
        )
        draw(axes[row, 0], loss, paths, end_marker="*")
        axes[row, 0].legend(fontsize=7, loc="upper right")
        axes[row, 0].set_title(f"{loss}: paths from {_start(chosen[0])} (o start, * end)", fontsize=10)
        ax = axes[row, 1]
        ax.set_yscale("log")
        first = [
            float(r.history[names.VAL_LOSS][1][0]) - f_star
            for r in chosen
            if len(r.history.get(names.VAL_LOSS, ((), ()))[1])
        ]
        ax.set_ylim(FLOOR / 2, 10 * max([v for v in first if np.isfinite(v)] + [1]))  # diverged runs go off the top
        ax.axhline(TOLERANCE, color="0.5", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel(f"f(w) - f* (global minimum; floored at {FLOOR:g})")
        ax.set_title(f"{loss}: loss above the global minimum\n(dotted: {TOLERANCE:g}; x: diverged)", fontsize=10)
        ax.legend(fontsize=7)
        ax_n, ax_f = axes[row, 2], axes[row, 3]
        for lr, final, reached, diverged, color in finals:
            if diverged:
                for ax in (ax_n, ax_f):
                    ax.plot([lr], [0.97], "x", color=color, ms=10, mew=2.5, transform=ax.get_xaxis_transform())
                continue
            if reached is None:
                ax_n.plot(
                    [lr], [0.97], "^", color=color, ms=9, mfc="none", mew=1.5, transform=ax_n.get_xaxis_transform()
                )
            else:
                ax_n.plot([lr], [reached], "o", color=color, ms=8)
                ax_n.annotate(str(reached), (lr, reached), textcoords="offset points", xytext=(6, 4), fontsize=8)
            ax_f.plot([lr], [max(final, FLOOR)], "o", color=color, ms=8)
        for ax in (ax_n, ax_f):
            ax.axvline(bound, color="k", ls="--", lw=1.2)
            ax.axvline(bound / 2, color="0.4", ls=":", lw=1.2)
            ax.text(
                bound,
                0.5,
                f" 2/L = {bound:.3g}\n (L = {surface.L:.4g}, the curvature\n at the global minimum)",
                transform=ax.get_xaxis_transform(),
                fontsize=8,
            )
            ax.text(bound / 2, 0.8, "1/L ", ha="right", transform=ax.get_xaxis_transform(), fontsize=8, color="0.3")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("learning rate")
        ax_n.set_ylim(0.7, 3 * budget)  # a loss where no rate reaches the tolerance still gets its axis
        ax_n.set_ylabel(f"updates to f(w) - f* < {TOLERANCE:g}")
        ax_n.set_title(f"{loss}: updates to the tolerance\n(△ on top: not within {budget}; x: diverged)", fontsize=10)
        ax_f.set_ylabel(f"final f(w) - f*, after {budget} updates")
        ax_f.set_title(f"{loss}: where each learning rate ends\n(x on top: diverged)", fontsize=10)
    fig.suptitle(title)
    text = (
        "Plain gradient descent on each toy loss at learning rates around 2/L, L the largest curvature at "
        "the global minimum (a quadratic with that curvature diverges above 2/L and converges fastest at 1/L, "
        "where the contraction |1 - ηL| is 0).\n\n"
        f"Updates to f(w) - f* < {TOLERANCE:g}: the first update after which val/loss (f(w) in float32, "
        "logged at every update) is within the tolerance of the global minimum's f*.\n\n"
        "Fastest first (lr / (2/L), then the updates to the tolerance, or the final f - f* where it was not "
        "reached):\n\n"
        + "\n".join(f"- {o}" for o in orders)
        + "\n\n"
        + table(
            ["loss", "lr", "lr / (2/L)", f"updates to f - f* < {TOLERANCE:g}", "ended", "final f - f*", "run"], rows
        )
    )
    return fig, text


PICTURES = {
    "local_minima": (local_minima, TOY_METRICS),
    "step_size": (step_size, TOY_METRICS),
    "edge_of_stability": (edge.edge_of_stability, edge.METRICS),
}


def make(name: str, tracking_uri: str, parent_run_id: str, out_dir: str | Path) -> dict[str, Path]:
    """Draw picture `name` of the sweep `parent_run_id`; write <name>.png and <name>.md into out_dir and log
    them to the parent run under report/. Returns {"png", "md"} -> path."""
    if name not in PICTURES:
        raise ReportError(f"no picture {name!r}: there are {', '.join(PICTURES)}")
    draw_it, metrics = PICTURES[name]
    client = skeleton.client(tracking_uri)
    parent, runs = select_runs(client, parent_run_id, metrics=metrics)
    title = f"{name}: sweep {parent.info.run_name} (run {parent.info.run_id}), {len(runs)} runs"
    fig, text = draw_it(runs, title)
    paths = skeleton.write(
        skeleton.folder(out_dir, parent), name, fig, f"# {title}\n\n{text}\n\n![{name}]({name}.png)\n"
    )
    skeleton.to_parent(client, parent.info.run_id, paths)
    return paths

"""The chapter's pictures as a sweep's report: experiment=local_minima, step_size and edge_of_stability.

The sweep's callback draws the one its preset names (hydra.callbacks.mlflow_sweep.pictures) beside the
convergence report, from the runs' record only, and logs <name>.png and <name>.md to the parent run under
report/. Like descent/reports/convergence.py it reads MLflow and draws with matplotlib's object API.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from descent.reports.convergence import ReportError, Run, select_runs

FLOOR = 1e-8  # f - f* below this is drawn here: the loop's float32 resolves f no finer near the minimum
TOY_METRICS = ("toy/w", "toy/x", "toy/y", "toy/step", "val/loss")
SHARPNESS_METRICS = ("sharpness/lambda_max", "sharpness/threshold", "train/loss")


def _float(run: Run, key: str, default=None):
    value = run.params.get(key)
    return default if value in (None, "None") else float(value)


def _start(run: Run) -> list[float]:
    import ast

    return [float(v) for v in ast.literal_eval(run.params["model.start"])]


def _path(run: Run) -> np.ndarray:
    """The run's trajectory: its start, then the point at each validation point (up to a non-finite one)."""
    from descent.nets.toy import LOSSES

    coords = LOSSES[run.params["model.loss"]].coords
    columns = [run.curve(f"toy/{c}")[1] for c in coords]
    n = min(map(len, columns))
    return np.concatenate([[_start(run)], np.stack([c[:n] for c in columns], 1)])


def _updates(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = run.curve(key)
    return run.progress("updates", steps), values


def _outcome(run: Run) -> tuple[str, str]:
    """(where it ended: global | local | diverged, in words with how)."""
    import torch

    from descent.nets.toy import LOSSES, which_minimum

    loss = run.params["model.loss"]
    if run.diverged:
        at = run.tags.get("diverged.updates")
        return "diverged", f"diverged (update {at})" if at else "diverged"
    end = _path(run)[-1]
    where = which_minimum(loss, end)
    gap = float(LOSSES[loss].fn(torch.tensor(end))) - float(LOSSES[loss].fn(torch.tensor(LOSSES[loss].minima[where])))
    steps = run.curve("toy/step")[1]
    last = float(np.mean(steps[-10:])) if len(steps) else float("nan")
    if gap < 1e-4:
        return where, f"in the {where} minimum"
    if len(steps) >= 20 and last > 0.5 * float(np.mean(steps[-20:-10])) and last > 1e-3:
        return where, f"oscillating about the {where} minimum (last steps {last:.3g})"
    return where, f"on its way to the {where} minimum (f - f* = {gap:.2g})"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# -- experiment=local_minima ----------------------------------------------------------------------------------

def _arm(run: Run, base_lr: float) -> tuple[float, bool]:
    """(β, control): a momentum run's β, or, for plain SGD at base_lr / (1 - β), that β and True."""
    momentum, lr = _float(run, "optimizer.momentum", 0.0), _float(run, "optimizer.lr")
    if momentum == 0 and lr > base_lr * (1 + 1e-9):
        return round(1 - base_lr / lr, 6), True
    return momentum, False


def local_minima(runs: list[Run], title: str):
    """Momentum from the same start on the double well, and its control, plain SGD at lr / (1 - β), with and
    without gradient noise: the paths on the curve, w against updates, and which minimum each run ended in."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from descent.nets.toy import draw

    base_lr = min(_float(r, "optimizer.lr") for r in runs)  # the momentum arms' lr; a control's is larger
    noises = sorted({_float(r, "data.noise", 0.0) for r in runs})
    momenta = sorted({_arm(r, base_lr)[0] for r in runs})
    colors = {m: colormaps["viridis"](i / max(1, len(momenta) - 1)) for i, m in enumerate(momenta)}

    def label(r):
        beta, control = _arm(r, base_lr)
        lr = _float(r, "optimizer.lr")
        return f"plain SGD, lr {lr:.3g} = {base_lr:g}/(1 - {beta:g})" if control else f"momentum {beta:g}, lr {lr:g}"

    fig = Figure(figsize=(20, 4.6 * len(noises)), layout="constrained")
    axes = fig.subplots(len(noises), 3, squeeze=False)
    rows, counts = [], {}
    for row, noise in enumerate(noises):
        chosen = [r for r in runs if _float(r, "data.noise", 0.0) == noise]
        seeds = sorted({int(r.params.get("seed", 0)) for r in chosen})
        first = {}  # one path per arm on the curve (the lowest seed): more would hide the curve
        for r in sorted(chosen, key=lambda r: int(r.params.get("seed", 0))):
            first.setdefault(_arm(r, base_lr), r)
        for col, control in ((0, False), (1, True)):
            paths = [(_path(r), colors[arm[0]], label(r)) for arm, r in sorted(first.items()) if arm[1] == control]
            draw(axes[row, col], "double_well", paths)
            what = f"plain SGD at lr {base_lr:g}/(1 - β)" if control else f"momentum β at lr {base_lr:g}"
            axes[row, col].set_title(f"gradient noise std {noise:g}: {what} (seed {seeds[0]}; o start, * end)",
                                     fontsize=10)
            if paths:
                axes[row, col].legend(fontsize=7, loc="upper right")
        ax = axes[row, 2]
        for r in chosen:
            beta, control = _arm(r, base_lr)
            x, w = _updates(r, "toy/w")
            ax.plot(np.r_[0, x], np.r_[_start(r), w], color=colors[beta], lw=1, alpha=0.8, ls="--" if control else "-")
            where, words = _outcome(r)
            counts.setdefault((noise, control, beta, _float(r, "optimizer.lr")), []).append(where)
            rows.append([f"{beta:g}", "plain SGD at lr/(1 - β)" if control else "momentum", r.params.get("optimizer.lr"),
                         f"{noise:g}", r.params.get("seed", "0"), f"{w[-1]:.4f}" if len(w) else "—", words, r.name])
        ax.axhline(-0.2696, color="0.5", ls=":", lw=1)
        ax.text(0, -0.2696, " barrier", va="bottom", fontsize=8, color="0.4")
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel("w")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_title(f"gradient noise std {noise:g}: w against updates, {len(seeds)} seed(s); solid momentum, "
                     "dashed its control", fontsize=10)
    fig.suptitle(title)
    summary = [[f"{beta:g}", "plain SGD" if control else "momentum", f"{lr:.4g}", f"{noise:g}", str(len(ends)),
                f"{ends.count('global')}/{len(ends)}", f"{ends.count('local')}/{len(ends)}",
                f"{ends.count('diverged')}/{len(ends)}"]
               for (noise, control, beta, lr), ends in sorted(counts.items())]
    text = ("Which minimum each run of the double well ended in: the minimum its final point's gradient flow "
            "reaches (descent.nets.toy.which_minimum). A momentum run (β at lr η) and its control (plain SGD at "
            "η/(1 - β), the step momentum reaches on a steady slope) share the row's β.\n\n"
            + _table(["β", "arm", "lr", "noise std", "runs", "global", "local", "diverged"], summary)
            + "\n\nEach run:\n\n"
            + _table(["β", "arm", "lr", "noise std", "seed", "final w", "ended", "run"], rows))
    return fig, text


# -- experiment=step_size -------------------------------------------------------------------------------------

TOLERANCE = 1e-5  # step_size's table: the updates gradient descent takes to f(w) - f* below this


def updates_to(run: Run, f_star: float, tol: float = TOLERANCE) -> int | None:
    """The first update after which f(w) - f* < tol (val/loss is f(w), logged at every update in the preset);
    None if the run never gets there."""
    x, v = _updates(run, "val/loss")
    below = np.flatnonzero(v - f_star < tol)
    return int(round(x[below[0]])) if len(below) else None


def step_size(runs: list[Run], title: str):
    """Learning rates from too small to divergent on each toy loss: paths, loss against updates, the updates
    each rate takes to f - f* < TOLERANCE, and the final loss, against the learning rate with 1/L and 2/L."""
    import torch
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from descent.nets.toy import LOSSES, draw

    losses = list(dict.fromkeys(r.params["model.loss"] for r in runs))
    fig = Figure(figsize=(22, 5 * len(losses)), layout="constrained")
    axes = fig.subplots(len(losses), 4, squeeze=False)
    rows, orders = [], []
    for row, loss in enumerate(losses):
        surface = LOSSES[loss]
        f_star = float(surface.fn(torch.tensor(surface.minima["global"])))
        bound = 2 / surface.L
        chosen = sorted([r for r in runs if r.params["model.loss"] == loss], key=lambda r: _float(r, "optimizer.lr"))
        colors = [colormaps["plasma"](0.9 * i / max(1, len(chosen) - 1)) for i in range(len(chosen))]
        budget = int(max(r.progress("updates", [r.history.get("val/loss", ([0], 0))[0][-1]])[0] for r in chosen))
        paths, finals = [], []
        for r, color in zip(chosen, colors):
            lr = _float(r, "optimizer.lr")
            label = f"lr {lr:.3g} = {lr / bound:.3g} × 2/L"
            path = _path(r)
            if len(path) > 1:
                paths.append((path, color, label + (" (diverged)" if r.diverged else "")))
            x, v = _updates(r, "val/loss")
            axes[row, 1].plot(x, np.maximum(v - f_star, FLOOR), color=color, lw=1.2, label=label)
            if r.diverged and len(x):
                axes[row, 1].plot(x[-1:], np.maximum(v[-1:] - f_star, FLOOR), "x", color=color, ms=9, mew=2)
            _, words = _outcome(r)
            final = float(v[-1]) - f_star if len(v) and not r.diverged else np.nan
            reached = None if r.diverged else updates_to(r, f_star)
            finals.append((lr, final, reached, r.diverged, color))
            rows.append([loss, f"{lr:.4g}", f"{lr / bound:.3g}",
                         "diverged" if r.diverged else f"not in {budget}" if reached is None else str(reached),
                         words, f"{final:.3g}" if np.isfinite(final) else "—", r.name])
        # the order of the rates that converge: fewest updates to the tolerance first, then the lowest final loss
        ranked = sorted([f for f in finals if not f[3]], key=lambda f: (f[2] is None, f[2] or 0, f[1]))
        orders.append(f"{loss}: " + " < ".join(
            f"{lr / bound:.3g}" + (f" ({n})" if n is not None else f" (f - f* = {final:.2g})")
            for lr, final, n, _, _ in ranked))
        draw(axes[row, 0], loss, paths, end_marker="*")
        axes[row, 0].legend(fontsize=7, loc="upper right")
        axes[row, 0].set_title(f"{loss}: paths from {_start(chosen[0])} (o start, * end)", fontsize=10)
        ax = axes[row, 1]
        ax.set_yscale("log")
        first = [float(r.history["val/loss"][1][0]) - f_star for r in chosen if len(r.history.get("val/loss", ((), ()))[1])]
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
                ax_n.plot([lr], [0.97], "^", color=color, ms=9, mfc="none", mew=1.5,
                          transform=ax_n.get_xaxis_transform())
            else:
                ax_n.plot([lr], [reached], "o", color=color, ms=8)
                ax_n.annotate(str(reached), (lr, reached), textcoords="offset points", xytext=(6, 4), fontsize=8)
            ax_f.plot([lr], [max(final, FLOOR)], "o", color=color, ms=8)
        for ax in (ax_n, ax_f):
            ax.axvline(bound, color="k", ls="--", lw=1.2)
            ax.axvline(bound / 2, color="0.4", ls=":", lw=1.2)
            ax.text(bound, 0.5, f" 2/L = {bound:.3g}\n (L = {surface.L:.4g}, the curvature\n at the global minimum)",
                    transform=ax.get_xaxis_transform(), fontsize=8)
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
    text = ("Plain gradient descent on each toy loss at learning rates around 2/L, L the largest curvature at "
            "the global minimum (a quadratic with that curvature diverges above 2/L and converges fastest at 1/L, "
            "where the contraction |1 - ηL| is 0).\n\n"
            f"Updates to f(w) - f* < {TOLERANCE:g}: the first update after which val/loss (f(w) in float32, "
            "logged at every update) is within the tolerance of the global minimum's f*.\n\n"
            "Fastest first (lr / (2/L), then the updates to the tolerance, or the final f - f* where it was not "
            "reached):\n\n" + "\n".join(f"- {o}" for o in orders) + "\n\n"
            + _table(["loss", "lr", "lr / (2/L)", f"updates to f - f* < {TOLERANCE:g}", "ended", "final f - f*",
                      "run"], rows))
    return fig, text


# -- experiment=edge_of_stability -----------------------------------------------------------------------------

EDGE = 0.9  # edge_of_stability: λ_max within this fraction of 2/η counts as at the edge
RISES_AFTER = 20  # edge_of_stability: updates that raised the training loss are counted after this one


def what_it_shows(x: np.ndarray, lam: np.ndarray, edge: float, diverged: bool) -> str:
    """The run's sharpness in words: a catapult from above 2/η, progressive sharpening to it and hovering there,
    or sharpening (or none) that stays below it. x: the updates of the measurements, λ_max at each."""
    if not len(lam) or not np.isfinite(edge):
        return "—"
    late = np.median(lam[len(lam) // 2:]) / edge
    if lam[0] > edge:
        if diverged:
            return "starts above 2/η and diverges"
        below = np.flatnonzero(lam < edge)
        if not len(below):
            return f"starts above 2/η ({lam[0] / edge:.2f} ×) and stays above it"
        caught = f"starts above 2/η ({lam[0] / edge:.2f} ×), falls below it by update {int(x[below[0]])}: a catapult"
        if late >= EDGE:
            return caught + f"; then hovers at the edge (2nd half at {late:.2f} × 2/η)"
        return caught + f"; then below the edge (2nd half at {late:.2f} × 2/η)"
    if (lam >= EDGE * edge).any():
        return ("sharpens to 2/η and hovers there" if late >= EDGE else "sharpens to 2/η, then falls below it") + \
            f" (2nd half at {late:.2f} × 2/η)"
    peak = int(np.argmax(lam))
    if lam[peak] > 1.05 * lam[0]:
        return (f"sharpens {lam[peak] / lam[0]:.2f}× by update {int(x[peak])} but stays below 2/η (at most "
                f"{lam[peak] / edge:.2f} ×), ends at {lam[-1] / edge:.2f} ×")
    return f"no sharpening: λ_max falls {lam[0]:.3g} → {lam[-1]:.3g}, below 2/η throughout ({lam[-1] / edge:.2f} × at the end)"


def edge_of_stability(runs: list[Run], title: str):
    """λ_max against updates beside 2/η for each learning rate, and the training loss, one row per loss."""
    from matplotlib.figure import Figure

    losses = sorted({r.params.get("model.loss", "cross_entropy") for r in runs})
    fig = Figure(figsize=(15, 5.2 * len(losses)), layout="constrained")
    axes = fig.subplots(len(losses), 2, squeeze=False)
    rows = []
    for row, name in enumerate(losses):
        ax_l, ax_loss = axes[row]
        chosen = sorted([r for r in runs if r.params.get("model.loss", "cross_entropy") == name],
                        key=lambda r: _float(r, "optimizer.lr"))
        for i, r in enumerate(chosen):
            color, lr = f"C{i}", _float(r, "optimizer.lr")
            x, lam = _updates(r, "sharpness/lambda_max")
            _, limit = _updates(r, "sharpness/threshold")
            edge = limit[0] if len(limit) else np.nan
            ax_l.plot(x, lam, ".-", color=color, lw=1.2, ms=4, label=f"lr {lr:g}: λ_max")
            if len(limit):
                ax_l.axhline(edge, color=color, ls="--", lw=1, label=f"lr {lr:g}: 2/η = {edge:.3g}")
            xl, loss = _updates(r, "train/loss")
            ax_loss.plot(xl, loss, color=color, lw=1.2, label=f"lr {lr:g}" + (" (diverged)" if r.diverged else ""))
            if len(lam):
                late_loss = loss[xl >= RISES_AFTER]  # at the edge the loss falls non-monotonically (Cohen et al.)
                rises = f"{int((np.diff(late_loss) > 0).sum())} of {max(len(late_loss) - 1, 0)}"
                reached = int(x[np.argmax(lam >= EDGE * edge)]) if (lam >= EDGE * edge).any() else None
                peak = int(np.argmax(lam))
                rows.append([name, f"{lr:g}", f"{edge:.3g}", f"{lam[0]:.3g}", f"{lam.max():.3g} (update {int(x[peak])})",
                             f"{lam[-1]:.3g} (update {int(x[-1])})", f"{np.median(lam[len(lam) // 2:]) / edge:.2f}",
                             "—" if reached is None else str(reached), f"{loss[-1]:.4g}" if len(loss) else "—", rises,
                             what_it_shows(x, lam, edge, r.diverged), r.name])
        ax_l.set_yscale("log")
        ax_l.set_xlabel("optimizer updates (full batch: one per epoch)")
        ax_l.set_ylabel("sharpness λ_max of the training loss's Hessian")
        ax_l.set_title(f"{name}: sharpness (solid) and its stability threshold 2/η (dashed)", fontsize=10)
        ax_l.legend(fontsize=7, ncols=2)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("optimizer updates")
        ax_loss.set_ylabel("training loss (full batch)")
        ax_loss.set_title(f"{name}: training loss", fontsize=10)
        ax_loss.legend(fontsize=8)
    fig.suptitle(title)
    text = ("Full-batch gradient descent on the MLP: the sharpness λ_max (Lanczos on Hessian-vector products, "
            "descent/measure/sharpness.py) against its threshold 2/η; the first measurement is after update 1 (the "
            f"first validation point). At the edge: λ_max ≥ {EDGE:g} × 2/η.\n\n"
            + _table(["loss", "lr", "2/η", "λ_max first", "λ_max max", "λ_max last", "median / (2/η), 2nd half",
                      f"update λ_max first ≥ {EDGE:g} × 2/η", "final train loss",
                      f"updates that raised the loss, after update {RISES_AFTER}", "what it shows", "run"], rows))
    return fig, text


PICTURES = {"local_minima": (local_minima, TOY_METRICS), "step_size": (step_size, TOY_METRICS),
            "edge_of_stability": (edge_of_stability, SHARPNESS_METRICS)}


def make(name: str, tracking_uri: str, parent_run_id: str, out_dir: str | Path) -> dict[str, Path]:
    """Draw picture `name` of the sweep `parent_run_id`; write <name>.png and <name>.md into out_dir and log
    them to the parent run under report/. Returns {"png", "md"} -> path."""
    from mlflow import MlflowClient

    from descent.tracking.store import resolve_uri

    if name not in PICTURES:
        raise ReportError(f"no picture {name!r}: there are {', '.join(PICTURES)}")
    draw, metrics = PICTURES[name]
    client = MlflowClient(resolve_uri(tracking_uri))
    parent, runs = select_runs(client, parent_run_id, metrics=metrics)
    title = f"{name}: sweep {parent.info.run_name} (run {parent.info.run_id}), {len(runs)} runs"
    fig, text = draw(runs, title)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / f"{name}.png", "md": out / f"{name}.md"}
    fig.savefig(paths["png"], dpi=100)
    paths["md"].write_text(f"# {title}\n\n{text}\n\n![{name}]({name}.png)\n")
    for path in paths.values():
        client.log_artifact(parent.info.run_id, str(path), "report")
    return paths

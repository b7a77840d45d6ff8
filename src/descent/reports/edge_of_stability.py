"""experiment=edge_of_stability's picture (descent/reports/pictures.py draws it for the sweep): the sharpness
λ_max against its stability threshold 2/η, and the training loss, for each learning rate."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from descent.reports.skeleton import Run, table
from descent.tracking import names

METRICS = (names.SHARPNESS, names.SHARPNESS_THRESHOLD, names.TRAIN_LOSS)  # the histories it reads

EDGE = 0.9  # edge_of_stability: λ_max within this fraction of 2/η counts as at the edge
RISES_AFTER = 20  # edge_of_stability: updates that raised the training loss are counted after this one


def what_it_shows(x: np.ndarray, lam: np.ndarray, edge: float, diverged: bool) -> str:
    """The run's sharpness in words: a catapult from above 2/η, progressive sharpening to it and hovering there,
    or sharpening (or none) that stays below it. x: the updates of the measurements, λ_max at each."""
    if not len(lam) or not np.isfinite(edge):
        return "—"
    late = np.median(lam[len(lam) // 2 :]) / edge
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
        return (
            "sharpens to 2/η and hovers there" if late >= EDGE else "sharpens to 2/η, then falls below it"
        ) + f" (2nd half at {late:.2f} × 2/η)"
    peak = int(np.argmax(lam))
    if lam[peak] > 1.05 * lam[0]:
        return (
            f"sharpens {lam[peak] / lam[0]:.2f}× by update {int(x[peak])} but stays below 2/η (at most "
            f"{lam[peak] / edge:.2f} ×), ends at {lam[-1] / edge:.2f} ×"
        )
    return f"no sharpening: λ_max falls {lam[0]:.3g} → {lam[-1]:.3g}, below 2/η throughout ({lam[-1] / edge:.2f} × at the end)"


def edge_of_stability(runs: list[Run], title: str):
    """λ_max against updates beside 2/η for each learning rate, and the training loss, one row per loss."""
    losses = sorted({r.params.get("model.loss", "cross_entropy") for r in runs})
    fig = Figure(figsize=(15, 5.2 * len(losses)), layout="constrained")
    axes = fig.subplots(len(losses), 2, squeeze=False)
    rows = []
    for row, name in enumerate(losses):
        ax_l, ax_loss = axes[row]
        chosen = sorted(
            [r for r in runs if r.params.get("model.loss", "cross_entropy") == name],
            key=lambda r: r.number("optimizer.lr"),
        )
        for i, r in enumerate(chosen):
            color, lr = f"C{i}", r.number("optimizer.lr")
            x, lam = r.by_updates(names.SHARPNESS)
            _, limit = r.by_updates(names.SHARPNESS_THRESHOLD)
            edge = limit[0] if len(limit) else np.nan
            ax_l.plot(x, lam, ".-", color=color, lw=1.2, ms=4, label=f"lr {lr:g}: λ_max")
            if len(limit):
                ax_l.axhline(edge, color=color, ls="--", lw=1, label=f"lr {lr:g}: 2/η = {edge:.3g}")
            xl, loss = r.by_updates(names.TRAIN_LOSS)
            ax_loss.plot(xl, loss, color=color, lw=1.2, label=f"lr {lr:g}" + (" (diverged)" if r.diverged else ""))
            if len(lam):
                late_loss = loss[xl >= RISES_AFTER]  # at the edge the loss falls non-monotonically (Cohen et al.)
                rises = f"{int((np.diff(late_loss) > 0).sum())} of {max(len(late_loss) - 1, 0)}"
                reached = int(x[np.argmax(lam >= EDGE * edge)]) if (lam >= EDGE * edge).any() else None
                peak = int(np.argmax(lam))
                rows.append(
                    [
                        name,
                        f"{lr:g}",
                        f"{edge:.3g}",
                        f"{lam[0]:.3g}",
                        f"{lam.max():.3g} (update {int(x[peak])})",
                        f"{lam[-1]:.3g} (update {int(x[-1])})",
                        f"{np.median(lam[len(lam) // 2 :]) / edge:.2f}",
                        "—" if reached is None else str(reached),
                        f"{loss[-1]:.4g}" if len(loss) else "—",
                        rises,
                        what_it_shows(x, lam, edge, r.diverged),
                        r.name,
                    ]
                )
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
    text = (
        "Full-batch gradient descent on the MLP: the sharpness λ_max (Lanczos on Hessian-vector products, "
        "descent/measure/sharpness.py) against its threshold 2/η; the first measurement is after update 1 (the "
        f"first validation point). At the edge: λ_max ≥ {EDGE:g} × 2/η.\n\n"
        + table(
            [
                "loss",
                "lr",
                "2/η",
                "λ_max first",
                "λ_max max",
                "λ_max last",
                "median / (2/η), 2nd half",
                f"update λ_max first ≥ {EDGE:g} × 2/η",
                "final train loss",
                f"updates that raised the loss, after update {RISES_AFTER}",
                "what it shows",
                "run",
            ],
            rows,
        )
    )
    return fig, text

"""Does the chosen learning rate follow McCandlish et al. 2018's ε_opt(B) = ε_max / (1 + B_noise/B)?

For each optimizer and target of a batch-size study, the rates the protocol chose (descent/sweep/protocol.py:
the first seed's fewest updates, on a √2 lattice) are fitted by ε(B) = ε_max / (1 + B_ε/B), least squares in
log ε. ε_max has a closed form for each B_ε, so B_ε is scanned on a log grid. Beside the fit:
- the range of B_ε over which the curve passes within one lattice step (×√2) of every chosen rate: the chosen
  rate is only known to that step, so this is the range the data allow (open-ended where the scan's edge is);
- the curve with B_ε the noise scale measured on the reference run (B_noise, else B_simple), ε_max refitted:
  its worst miss, a factor. A miss within ×√2 means the rule with the measured scale fits as well as the
  lattice can tell.
"""

from __future__ import annotations

import math

import numpy as np

STEP = math.sqrt(2)  # the protocol's refinement: a chosen rate is known to one lattice step
GRID = 400  # points of the B_ε scan per run of the report
SPAN = 100.0  # the scan runs from the smallest B / SPAN to the largest B x SPAN


def _eps_max(b: np.ndarray, eps: np.ndarray, scale: float) -> tuple[float, np.ndarray]:
    """ε_max for one B_ε (least squares in log ε) and the log residuals of the chosen rates."""
    shape = -np.log1p(scale / b)  # log of ε / ε_max on the curve
    log_max = float(np.mean(np.log(eps) - shape))
    return math.exp(log_max), np.log(eps) - (log_max + shape)


def fit(batch_sizes, rates, scale: float | None = None) -> dict:
    """The rule fitted to the chosen rates (one per batch size); with `scale`, also the curve at B_ε = scale."""
    b, eps = np.asarray(batch_sizes, float), np.asarray(rates, float)
    grid = np.geomspace(b.min() / SPAN, b.max() * SPAN, GRID)
    fits = [_eps_max(b, eps, float(s)) for s in grid]
    worst = np.array([np.abs(r).max() for _, r in fits])
    best = int(np.argmin([np.square(r).sum() for _, r in fits]))
    eps_max, residuals = fits[best]
    inside = np.flatnonzero(worst <= math.log(STEP) + 1e-12)
    low = high = float("nan")
    if inside.size:  # open-ended where the allowed range reaches the edge of the scan
        low = 0.0 if inside[0] == 0 else float(grid[inside[0]])
        high = math.inf if inside[-1] == GRID - 1 else float(grid[inside[-1]])
    out = {
        "points": len(b),
        "eps_max": eps_max,
        "b_fit": float(grid[best]),
        "b_fit_low": low,
        "b_fit_high": high,
        "miss_fit": math.exp(float(np.abs(residuals).max())),
    }
    if scale is not None and scale > 0:
        at_scale, r = _eps_max(b, eps, scale)
        out |= {"scale": scale, "eps_max_scale": at_scale, "miss_scale": math.exp(float(np.abs(r).max()))}
    return out


def rules(rows: list[dict], fits: dict, noise: dict) -> list[dict]:
    """One fit per (optimizer, target) with chosen rates at 3 or more batch sizes in the fit."""
    out = []
    for opt, acc in fits:
        cells = sorted(
            (r["batch_size"], r["best_lr"])
            for r in rows
            if r["optimizer"] == opt and r["target"] == acc and r["best_lr"] and r.get("in_fit", True)
        )
        if len(cells) < 3:
            continue
        measured = noise.get((opt, acc), {})
        name = "b_noise" if "b_noise" in measured else "b_simple" if "b_simple" in measured else None
        result = fit([c[0] for c in cells], [c[1] for c in cells], measured.get(name) if name else None)
        out.append({"optimizer": opt, "target": acc, "scale_name": name, "b_crit": fits[opt, acc]["b_crit"]} | result)
    return out

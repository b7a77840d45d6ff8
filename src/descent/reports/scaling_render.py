"""The batch-size scaling report's figure, Markdown and CSV rows, drawn from what descent.reports.scaling.analyse and
ratios compute."""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from descent.reports import rate_rule
from descent.reports.scaling import BOOTSTRAP, SCALES, _g, by_seed, ratios


MARKERS = "osD^vP*X"


def one_batch_size(rows: list[dict]) -> bool:
    """A study at one batch size (experiment=optimizer_comparison): optimizers side by side, no S(B) to fit."""
    return len({r["batch_size"] for r in rows}) == 1


def ranking(rows: list[dict]) -> list[dict]:
    """Per target, the optimizers by median updates, each with its seeds' range and whether that range lies wholly
    below the next one's (3 seeds: the only separation they can show; no interval of a median is claimed)."""
    out = []
    for acc in sorted({r["target"] for r in rows}):
        found = [r for r in rows if r["target"] == acc and r["updates_to_target"]]
        found.sort(key=lambda r: r["updates_to_target"])
        for k, r in enumerate(found):
            seeds = by_seed(r)
            after = found[k + 1] if k + 1 < len(found) else None
            below = after is not None and max(seeds) < min(by_seed(after))
            out.append(
                {
                    "target": acc,
                    "rank": k + 1,
                    "optimizer": r["optimizer"],
                    "lr": r["best_lr"],
                    "s": r["updates_to_target"],
                    "low": min(seeds),
                    "high": max(seeds),
                    "seeds": len(seeds),
                    "ratio": r["updates_to_target"] / found[0]["updates_to_target"],
                    "separated": None if after is None else below,
                }
            )
    return out


def plot_one_batch_size(rows: list[dict], title: str):
    """Updates to each target per optimizer: the seeds' median, bars their range."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    palette = colormaps["tab10"]
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    for i, opt in enumerate(opts):
        pts = sorted((r["target"], r) for r in rows if r["optimizer"] == opt and r["updates_to_target"])
        if not pts:
            continue
        x = np.array([a for a, _ in pts]) + 0.0006 * (i - len(opts) / 2)
        s = np.array([r["updates_to_target"] for _, r in pts], float)
        spread = [by_seed(r) for _, r in pts]
        lo, hi = np.array([min(v) for v in spread]), np.array([max(v) for v in spread])
        ax.errorbar(x, s, yerr=[s - lo, hi - s], fmt="o-", color=palette(i % 10), capsize=3, label=opt)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    batch = rows[0]["batch_size"] if rows else "?"
    ax.set(
        xlabel="target validation accuracy",
        ylabel="updates to target (median over seeds; bars: their range)",
        title=f"updates to each target at B = {batch}, each optimizer at the rate chosen for it",
    )
    ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150))
    return fig


def plot(rows: list[dict], fits: dict, noise: dict, title: str):
    if one_batch_size(rows):
        return plot_one_batch_size(rows, title)
    fig = Figure(figsize=(15, 11), layout="constrained")
    (ax_s, ax_e), (ax_lr, ax_b) = fig.subplots(2, 2)
    palette = colormaps["tab10"]
    opts = list(dict.fromkeys(opt for opt, _ in fits))
    accs = sorted({acc for _, acc in fits})
    top = accs[-1] if accs else None
    for i, opt in enumerate(opts):
        color = palette(i)
        for j, acc in enumerate(accs):
            f = fits.get((opt, acc))
            if f is None:
                continue
            pts = [r for r in rows if r["optimizer"] == opt and r["target"] == acc and r["updates_to_target"]]
            b = np.array([r["batch_size"] for r in pts], float)
            s = np.array([r["updates_to_target"] for r in pts], float)
            e = np.array([r["examples_to_target"] for r in pts], float)
            spread = [by_seed(r) for r in pts]
            lo, hi = np.array([min(v) for v in spread]), np.array([max(v) for v in spread])
            marker, alpha = MARKERS[j % len(MARKERS)], 0.35 + 0.65 * (j + 1) / len(accs)
            fitted = np.array([r.get("in_fit", True) for r in pts], bool)
            for keep, face, label in ((fitted, color, f"{opt} @ {acc:g}"), (~fitted, "white", None)):
                if keep.any():  # open markers: cells left out of the fit (fewer seeds: not finished)
                    ax_s.errorbar(
                        b[keep],
                        s[keep],
                        yerr=[(s - lo)[keep], (hi - s)[keep]],
                        fmt=marker,
                        color=color,
                        mfc=face,
                        alpha=alpha,
                        ms=5,
                        capsize=2,
                        label=label,
                    )
                    ax_e.plot(s[keep], e[keep], marker, color=color, mfc=face, alpha=alpha, ms=5)
            if math.isfinite(f["s_min"]) and len(pts):
                grid = np.geomspace(min(b.min(), 1), max(b.max(), 2), 200)
                fit_s = f["s_min"] + f["e_min"] / grid
                ax_s.plot(grid, fit_s, "-", color=color, lw=1, alpha=alpha)
                ax_e.plot(fit_s, grid * fit_s, "-", color=color, lw=1, alpha=alpha)
            if acc == top:
                lrs = [(r["batch_size"], r["best_lr"]) for r in pts]
                if lrs:
                    lb, lv = np.array(lrs, float).T
                    ax_lr.plot(lb, lv, "o-", color=color, label=f"{opt} (target {acc:g})")
                    ax_lr.plot(lb, lv[0] * np.sqrt(lb / lb[0]), ":", color=color, lw=0.8, alpha=0.7)
        crit = [(acc, fits[opt, acc]) for acc in accs if (opt, acc) in fits and math.isfinite(fits[opt, acc]["b_crit"])]
        if crit:
            x = np.array([a for a, _ in crit])
            y = np.array([f["b_crit"] for _, f in crit])
            lo = np.array([f["b_crit_low"] for _, f in crit])
            hi = np.array([f["b_crit_high"] for _, f in crit])
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax_b.errorbar(
                x + 0.0008 * (i - len(opts) / 2),
                y,
                yerr=np.where(ok, [y - lo, hi - y], 0),
                fmt="o-",
                color=color,
                capsize=3,
                label=f"{opt}: B_crit (95 % bootstrap over seeds)",
            )
        for j, name in enumerate(SCALES):
            found = sorted((acc, v) for (o, acc), v in noise.items() if o == opt and name in v)
            if found:
                x = np.array([a for a, _ in found]) + 0.0008 * (i - len(opts) / 2) + 0.0004 * (j + 2)
                y, se = (np.array([v[k] for _, v in found]) for k in (name, name + "_se"))
                ax_b.errorbar(
                    x,
                    y,
                    yerr=1.96 * se,
                    fmt="^:" if j == 0 else "v:",
                    color=color,
                    mfc="white",
                    capsize=3,
                    label=f"{opt}: {name.replace('b_', 'B_')} ± 1.96 se",
                )
        simple = sorted((acc, v) for (o, acc), v in noise.items() if o == opt and "b_simple" in v)
        if simple:
            x = np.array([a for a, _ in simple])
            y = np.array([v["b_simple"] for _, v in simple])
            se = np.array([v["b_simple_se"] for _, v in simple])
            ax_b.errorbar(
                x + 0.0008 * (i - len(opts) / 2) + 0.0004,
                y,
                yerr=1.96 * se,
                fmt="s--",
                color=color,
                mfc="white",
                capsize=3,
                label=f"{opt}: B_simple ± 1.96 se (B = {simple[0][1]['batch_size']})",
            )
    for ax in (ax_s, ax_e, ax_lr):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    ax_b.set_yscale("log")
    ax_b.grid(True, which="major", alpha=0.3)
    for ax, xlabel, ylabel, heading in (  # each panel's axis labels and title
        (
            ax_s,
            "batch size B",
            "updates to target S (median over seeds; bars: their range)",
            "updates to each target: S_min + E_min/B (lines);\nopen markers: cells left out of the fit",
        ),
        (
            ax_e,
            "updates to target S",
            "examples trained on to target E",
            "the trade-off (S/S_min − 1)(E/E_min − 1) = 1:\nexamples actually trained on",
        ),
        (
            ax_lr,
            "batch size B",
            "chosen learning rate (first seed)",
            "the rate chosen per cell (highest target); dotted: square-root rule",
        ),
        (
            ax_b,
            "target validation accuracy",
            "batch size",
            "B_crit = E_min/S_min per target;\nB_simple, B_noise on the reference run (open markers)",
        ),
    ):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=heading)
    for ax in (ax_s, ax_e, ax_lr, ax_b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 150))
    return fig


def markdown(rows: list[dict], fits: dict, noise: dict, header: str, n_boot: int = BOOTSTRAP) -> str:
    lines = [
        header,
        "",
        "| optimizer | B | target | trials | chosen lr | seeds reached / run | updates to target "
        "(median) | by seed | examples to target (median) | resolution |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        resolution = "—" if r["resolution"] is None else f"{100 * r['resolution']:.2g} %"
        lines.append(
            f"| {r['optimizer']} | {r['batch_size']} | {r['target']:g} | {r['trials']} | {_g(r['best_lr'])} | "
            f"{r['seeds_reached']}/{r['seeds']} | {_g(r['updates_to_target'])} | {r['updates_by_seed']} | "
            f"{_g(r['examples_to_target'])} | {resolution} |"
        )
    if left := [r for r in rows if r["updates_to_target"] and not r.get("in_fit", True)]:
        lines += [
            "",
            "Left out of the fit (measured on fewer seeds than the other cells: the cell's protocol has not "
            "finished): " + ", ".join(f"{r['optimizer']} B {r['batch_size']} @ {r['target']:g}" for r in left) + ".",
        ]
    coarse = [r for r in rows if r["resolution"] is not None and r["resolution"] > 0.02]
    lines += [
        "",
        "Resolved to <= 2 % (updates between two checks of the target over S): "
        + (
            "every cell."
            if not coarse
            else "all but "
            + ", ".join(
                f"{r['optimizer']} B {r['batch_size']} @ {r['target']:g} ({100 * r['resolution']:.2g} %)"
                for r in coarse
            )
            + "."
        ),
    ]
    single = one_batch_size(rows)  # optimizers side by side: a ranking instead of the fit's table
    if single:
        lines += [
            "",
            "| target | rank | optimizer | chosen lr | updates (median) | seeds' range | × the first | "
            "range below the next's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {q['target']:g} | {q['rank']} | {q['optimizer']} | {_g(q['lr'])} | {_g(q['s'])} | "
            f"[{_g(q['low'])}, {_g(q['high'])}] ({q['seeds']} seeds) | {q['ratio']:.2f} | "
            f"{'—' if q['separated'] is None else 'yes' if q['separated'] else 'no'} |"
            for q in ranking(rows)
        ]
        lines += [
            "",
            "One batch size: S(B) is not fitted (experiment=batch_scaling varies B). With 3 seeds no interval of "
            "a median is claimed: two optimizers are told apart only where every seed of one is faster than every "
            'seed of the other ("range below the next\'s").',
        ]
    else:
        lines += [
            "",
            "| optimizer | target | points | seeds per point | S_min [95 %] | E_min [95 %] | B_crit = E_min/S_min "
            "[95 % bootstrap over seeds] | B_simple ± se (reference run) | B_noise ± se | B_precond ± se |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for (opt, acc), f in {} if single else fits.items():
        n = noise.get((opt, acc), {})
        simple, curved, precond = (
            f"{_g(n[k])} ± {_g(n[k + '_se'])}" if k in n else "—" for k in ("b_simple", "b_noise", "b_precond")
        )
        lines.append(
            f"| {opt} | {acc:g} | {f['points']} | {f['seeds_per_point']} | {_g(f['s_min'])} "
            f"[{_g(f['s_min_low'])}, {_g(f['s_min_high'])}] | {_g(f['e_min'])} [{_g(f['e_min_low'])}, "
            f"{_g(f['e_min_high'])}] | {_g(f['b_crit'])} [{_g(f['b_crit_low'])}, {_g(f['b_crit_high'])}] "
            f"({f['bootstrap_finite']} finite) | {simple} | {curved} | {precond} |"
        )
    if rule := [] if single else rate_rule.rules(rows, fits, noise):
        lines += [
            "",
            "The chosen rate against McCandlish et al.'s rule ε(B) = ε_max / (1 + B_ε/B):",
            "",
            "| optimizer | target | batch sizes | ε_max | B_ε fitted [range within ×√2 of every chosen rate] | "
            "worst miss of the fit | B_ε = the measured scale | its ε_max | its worst miss | B_crit |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for q in rule:
            measured = (
                f"{q['scale_name']} {_g(q['scale'])} | {_g(q['eps_max_scale'])} | ×{q['miss_scale']:.2f}"
                if "scale" in q
                else "— | — | —"
            )
            lines.append(
                f"| {q['optimizer']} | {q['target']:g} | {q['points']} | {_g(q['eps_max'])} | {_g(q['b_fit'])} "
                f"[{_g(q['b_fit_low'])}, {_g(q['b_fit_high'])}] | ×{q['miss_fit']:.2f} | {measured} | "
                f"{_g(q['b_crit'])} |"
            )
        lines += [
            "",
            "The rates are the first seed's choices on the protocol's √2 lattice, so a curve within ×√2 of each "
            "fits as well as they can tell; the range is every B_ε for which it does (—: none does; 0 or inf: "
            "open at that end of a scan from the smallest B / 100 to the largest B x 100). The measured scale is "
            "the reference run's B_noise at that target (else B_simple), with ε_max refitted (descent/reports/"
            "rate_rule.py).",
        ]
    if pairs := ratios(rows, n_boot=n_boot):
        a, m = pairs[0]["pair"]
        lines += [
            "",
            f"| B | target | S_{a}/S_{m} = E_{a}/E_{m} [95 % bootstrap over seeds] | seeds ({a}, {m}) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {p['batch_size']} | {p['target']:g} | {_g(p['ratio'])} [{_g(p['low'])}, {_g(p['high'])}] | "
            f"{p['seeds'][0]}, {p['seeds'][1]} |"
            for p in pairs
        ]
        lines += ["", f"Above 1: {m} reached the target in fewer updates (and, at the same B, examples) than {a}."]
    lines += [
        "",
        "A point: per optimizer, batch size and target, the learning rate with the fewest updates to the "
        "target among the first seed's trials, then the median over the seeds run at that rate (the first "
        "seed's run included). The fit: least squares on relative residuals of S(B) = S_min + E_min/B with "
        f"S_min, E_min >= 0. Intervals: {n_boot} resamples of each cell's seeds with replacement, the medians "
        "refitted, 2.5th to 97.5th percentiles (an interval over seeds at the chosen rates; the choice of the "
        "rate itself is not resampled). Resolution: updates between two checks of the target over the updates "
        "to it. B_simple = tr Σ/|G|² over the whole training set at the first validation point past each "
        "target of the reference run (the reference cell's chosen rate), ± its delete-one-block jackknife "
        "standard error over the training examples. B_noise = tr(HΣ)/(GᵀHG) and B_precond = tr(PΣ)/(GᵀPG) (P the "
        "optimizer's diagonal preconditioner; Adam-type optimizers only) at the same points, ± their jackknife "
        "standard errors (descent/measure/curvature_noise.py).",
        "",
        "![scaling](scaling.png)",
        "",
    ]
    return "\n".join(lines)


def csv_rows(rows: list[dict], fits: dict) -> list[dict]:
    """The table's rows, each with its fit's numbers (fit_s_min, ...)."""
    return [r | {f"fit_{k}": v for k, v in fits.get((r["optimizer"], r["target"]), {}).items()} for r in rows]

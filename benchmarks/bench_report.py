"""The benchmark's Markdown report: the machine, the contention flags, the table and the overheads."""

from __future__ import annotations

import os
import platform
import statistics

from bench_regimes import BUSY, CONTENDED, TODAY, Regime, Row


def excess(row: Row) -> list[float]:
    """Other processes' share of the cores beyond what the row asked for (a busy-* row's competitor: one core)."""
    expected = 1 / os.cpu_count() if row.regime.busy else 0.0
    return [o - expected for o in row.others]


def contention(rows: dict) -> list[str]:
    others = [o for row in rows.values() for o in excess(row)]
    if not others or max(others) <= CONTENDED:
        return []
    flagged = [f"{key[0]}/{key[1]}" for key, row in rows.items() if statistics.median(excess(row)) > CONTENDED]
    return [
        f"**Other processes were busy during some timed epochs: a median {100 * statistics.median(others):.0f} % of "
        f"the cores, {100 * max(others):.0f} % at most (busy-* rows: beyond their own competitor); rows flagged "
        f"CONTENDED: {', '.join(flagged) or 'none'}.** Rows at 2 threads with OpenMP's default wait (-2t) can be "
        "several times too long under such load (each parallel op waits for a descheduled thread); the policy's "
        "rows much less so. The ranges in the notes show it; rerun on a quieter machine to compare.",
        "",
    ]


def machine(info: dict) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- torch {info.get('torch', '?')}, intra-op threads per row (column threads: count and OpenMP's wait), "
        f"{info.get('interop_threads', '?')} inter-op"
        + "; flush-denormal on for descent and the plain loop, set as descent sets it (before the data is loaded:"
        " torch's flag is per thread, and OpenMP's threads copy it when they start)"
        + (
            f"; keras {info['keras']} (torch backend, flush-denormal off: as a user gets it)"
            if "keras" in info
            else "; Keras not run (--no-keras, or not installed: pip install -e '.[bench]')"
        ),
    ] + ([f"- GPU: {info['gpu']} (gpu-* rows)"] if info.get("gpu") else [])


def fmt(x: float, digits: int = 3) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def verdict(ratio: float, target: float, what: str) -> str:
    return f"<= {target:g}x {what}: {'met' if ratio <= target else 'MISSED'} ({ratio:.2f}x)"


def threads_used(row: Row) -> str:
    """Intra-op threads and OpenMP's wait (descent.engine.threads.wait_policy) of the row's processes (Keras: as a user gets them)."""
    if "threads" not in row.extra:
        return "torch's default"
    return ", ".join(sorted({f"{n} ({w})" for n, w in zip(row.extra["threads"], row.extra["wait_policy"])}))


def table(rows: dict[tuple[str, str], Row], regs: list[Regime]) -> list[str]:
    head = [
        "regime",
        "contender",
        "threads",
        "n",
        "s / epoch of 60000",
        "ms / update",
        "x plain",
        "x plain, fastest epochs",
        "x Keras",
        "peak RSS MiB (+ over imports)",
        "test acc",
        "others' CPU %",
        "target",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for reg in regs:
        plain = rows[reg.key, "plain"]
        keras = rows.get((reg.key, "keras"))
        for name in reg.contenders:
            row = rows[reg.key, name]
            epoch = row.median_epoch()
            per_update = statistics.median(row.ms_per_update)
            ratio = statistics.median(row.ms_per_update) / statistics.median(plain.ms_per_update)
            # other work only ever adds time: the fastest epochs of two contenders are the least disturbed pair
            fastest = min(row.ms_per_update) / min(plain.ms_per_update)
            vs_keras = epoch / keras.median_epoch() if keras else float("nan")
            peaks, bases = row.extra.get("peak_rss_mib", [float("nan")]), row.extra.get("base_rss_mib", [float("nan")])
            peak = max(peaks)
            grown = max(p - b for p, b in zip(peaks, bases))
            acc = statistics.median(row.extra["test_acc"]) if "test_acc" in row.extra else float("nan")
            target = ""
            quiet = rows.get((reg.key.removeprefix("busy-"), name))
            today = rows.get((reg.key, name + "-2t"))
            if reg.busy and quiet:  # the target: one core taken costs <= BUSY x
                target = verdict(per_update / statistics.median(quiet.ms_per_update), BUSY, "quiet")
            elif name in ("descent", "train.py", "descent-compiled"):
                target = verdict(ratio, reg.target, "plain")
                if reg.key == "seed" and keras:
                    target += "; " + verdict(vs_keras, 0.5, "Keras")
            if not reg.busy and reg.batching == "online" and today:  # the target: the policy's one thread vs 2
                target += ("; " if target else "") + verdict(
                    per_update / statistics.median(today.ms_per_update), TODAY, "2 threads"
                )
            spread = row.seconds if reg.batching != "online" else row.ms_per_update
            unit = "s" if reg.batching != "online" else "ms/update"
            notes = [f"range {fmt(min(spread))}-{fmt(max(spread))} {unit}"]
            if statistics.median(excess(row)) > CONTENDED:
                notes.insert(0, "CONTENDED")
            if "compile_seconds" in row.extra:
                notes.append("compile " + ", ".join(f"{c:.1f}" for c in row.extra["compile_seconds"]) + " s (excluded)")
            if "wall_seconds" in row.extra and reg.batching != "online":
                walls = [w for ws in row.extra["wall_seconds"] for w in ws[1:]]
                notes.append(f"lightning wall {fmt(statistics.median(walls))} s/epoch")
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"{reg.key} ({reg.title})",
                        name,
                        threads_used(row),
                        str(len(row.seconds)),
                        fmt(epoch),
                        fmt(per_update),
                        f"{ratio:.2f}",
                        f"{fastest:.2f}",
                        "-" if vs_keras != vs_keras else f"{vs_keras:.2f}",
                        f"{peak:.0f} (+{grown:.0f})" if peak == peak else "-",
                        "-" if acc != acc else f"{acc:.4f}",
                        f"{100 * statistics.median(row.others):.0f} (max {100 * max(row.others):.0f})",
                        target,
                        "; ".join(notes),
                    ]
                )
                + " |"
            )
    return lines


STARTUP = "`src/train.py trainer.max_epochs=1 data.limit_train=1024`"  # the start-up row's runs (first_update_seconds)


def overheads(
    rows: dict[tuple[str, str], Row], firsts: list[float], walls: list[float], startup: str = STARTUP
) -> list[str]:
    lines = ["| overhead | median | values | notes |", "|---|---|---|---|"]
    if ("seed", "descent") in rows:
        run = rows["seed", "descent"]
        share = [100 * lg / tr for lg, tr in zip(run.extra["logger_seconds"], run.extra["train_seconds"])]
        bare = rows.get(("seed", "descent-bare"))
        diff = (
            f"; descent-bare's epochs (noise scale, system metrics, checkpoints, bar off) are "
            f"{100 * (bare.median_epoch() / run.median_epoch() - 1):+.1f} % against these"
            if bare
            else ""
        )
        lines.append(
            f"| MLflow logging, % of seed-epoch time | {statistics.median(share):.2f} % | "
            + ", ".join(f"{s:.2f}" for s in share)
            + " | time inside descent.tracking.logger.Logger's log_metrics/flush/save (sqlite store, final flush "
            f"included) over the Classifier's training seconds, in the seed run as src/train.py builds it{diff} |"
        )
        share = [100 * m / t for m, t in zip(run.extra["measure_seconds"], run.extra["train_seconds"])]
        lines.append(
            f"| gradient noise scale, % of seed training time | {statistics.median(share):.2f} % | "
            + ", ".join(f"{s:.2f}" for s in share)
            + " | time inside descent.measure.noise.NoiseScale (probe of trainer.noise_probe=1024 examples at each "
            "validation point: each epoch's end in the seed run) over the Classifier's training seconds, warm-up "
            "epoch included; the issue's bar: <= 3 % for on by default |"
        )
    if firsts:
        lines.append(
            f"| start-up to first update, s | {statistics.median(firsts):.2f} s | "
            + ", ".join(f"{s:.2f}" for s in firsts)
            + f" | {startup} (descent's own log line); whole command "
            f"{statistics.median(walls):.1f} s; the first run creates the sqlite store |"
        )
    return lines + [""] if len(lines) > 2 else []

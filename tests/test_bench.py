"""The benchmark's smoke run: every regime and contender measured, every number finite and positive."""

import math
import os
import subprocess
import sys

from conftest import ROOT
from descent.engine.threads import SPIN_COUNT

THREADS = {"plain", "descent", "plain-2t", "descent-2t"}  # the thread policy's rows and 2 threads
CONTENDERS = {
    # train.py: the whole command, at the policy and (-2t) at 2 threads with libgomp's spin
    "seed": {"train.py", "train.py-2t", "descent-compiled", "descent-bare"} | THREADS,
    "online-sgd": THREADS,
    "online-rmsprop": {"plain", "descent", "descent-compiled"},
    "full-batch": {"plain", "descent"},
    "busy-seed": THREADS,  # beside one other CPU-bound process
    "busy-online-sgd": THREADS,
}
GPU = {"plain", "descent", "descent-eager", "bare-graph"}  # rows the bench adds where CUDA is available


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_quick_bench_reports_every_regime(tmp_path, mnist_root):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--no-keras", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text in proc.stdout  # printed and written alike
    assert "torch " in text and "intra-op threads" in text and "CPU:" in text

    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| regime |"))
    columns = cells(lines[head])
    seen: dict[str, set[str]] = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(columns, cells(line)))
        regime = row["regime"].split()[0]
        seen.setdefault(regime, set()).add(row["contender"])
        for key in ("s / epoch of 60000", "ms / update", "x plain"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, line)
        assert float(row["peak RSS MiB (+ over imports)"].split()[0]) > 0, line
        if regime.startswith("busy-"):
            assert "x quiet:" in row["target"], line  # the same row without the other process
        elif row["contender"] in ("descent", "descent-compiled"):
            assert "x plain:" in row["target"], line
        if regime == "online-sgd" and row["contender"] in ("plain", "descent"):
            assert "x 2 threads:" in row["target"], line
        threads = (
            "2 (spin 300000)"  # the whole command reports the GOMP_SPINCOUNT it was given: libgomp's default
            if row["contender"] == "train.py-2t"
            else "2 (libgomp's default: spin 300000)"
            if row["contender"].endswith("-2t")
            else f"1 (spin {SPIN_COUNT})"
            if "online" in regime
            else f"2 (spin {SPIN_COUNT})"  # the policy at batch 128 on this machine, as the run itself reported
            if row["contender"] == "train.py" and len(os.sched_getaffinity(0)) >= 2
            else None
        )
        assert threads is None or row["threads"] == threads, line  # online: the policy's one thread and spin
        if regime.endswith("seed"):
            assert 0 < float(row["test acc"]) <= 1, line
    import torch

    gpu = {f"gpu-{r}": GPU for r in ("seed", "online-sgd", "full-batch")} if torch.cuda.is_available() else {}
    assert seen == CONTENDERS | gpu

    overheads = {
        cells(line)[0]: cells(line) for line in lines if line.startswith(("| MLflow", "| gradient noise", "| start-up"))
    }
    assert set(overheads) == {
        "MLflow logging, % of seed-epoch time",
        "gradient noise scale, % of seed training time",
        "start-up to first update, s",
    }
    for name, row in overheads.items():
        value = float(row[1].split()[0])
        assert math.isfinite(value) and value > 0, (name, row)

"""The benchmark's regimes (the rows of its table), the rows their results go into, and the constants the other
parts of bench.py share."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SEED = 0
CONTENDED = 0.2  # other processes' median share of the cores above which a row's timing is flagged
BUSY = 1.3  # the target: a busy-* row's median <= this x the same contender's quiet median
TODAY = 0.75  # the target: online SGD at the thread policy <= this x at 2 threads (descent-2t)
FIRST_UPDATE = re.compile(r"first update ([0-9.]+) s after the process started")


@dataclass(frozen=True)
class Regime:
    key: str  # row label
    title: str
    optimizer: str  # conf/optimizer/<name>.yaml
    batching: str  # conf/batching/<name>.yaml
    limit: int | None  # first N training examples; None = all 60000
    epochs: int  # warm-up epoch included
    contenders: tuple[str, ...]
    target: float  # descent's median must be <= target x the plain loop's
    device: str = "cpu"
    busy: bool = False  # one other CPU-bound process runs beside each job
    model: str = "mlp"  # conf/model/<name>.yaml


def regimes(quick: bool, keras: bool, gpu: bool = False) -> list[Regime]:
    seed = ("plain", "descent", "train.py", "descent-compiled", "descent-bare") + (("keras",) if keras else ())
    n, online_n = (2048, 100) if quick else (None, 2000)  # training examples: the whole set, the online rows'
    short, long = (3, 3) if quick else (4, 5)  # epochs (warm-up included) of the online and busy rows, the others
    # the GPU targets on an H200, as ratios to the plain loop it measured there (0.734 s/epoch seed,
    # 0.99 ms/update online); full batch: <= 1.5x plain
    graph = ("plain", "descent", "descent-eager", "bare-graph")
    gpu_n, gpu_epochs = (500, 3) if quick else (10000, 6)
    gpus = [
        Regime(
            "gpu-seed",
            "rmsprop, batch 128, CUDA; H200 target 0.10 s/epoch",
            "rmsprop",
            "mini",
            n,
            gpu_epochs,
            graph,
            0.136,
            "cuda",
        ),
        Regime(
            "gpu-online-sgd",
            f"sgd lr 0.01, batch 1, first {gpu_n}, CUDA; H200 target 0.07 ms/update",
            "sgd",
            "online",
            gpu_n,
            short,
            graph,
            0.071,
            "cuda",
        ),
        Regime("gpu-full-batch", "sgd lr 0.01, batch = all, CUDA", "sgd", "full", n, gpu_epochs, graph, 1.5, "cuda"),
    ]
    threads = ("plain", "descent", "plain-2t", "descent-2t")  # the thread policy against 2 threads
    cpu = [
        Regime("seed", "rmsprop, batch 128", "rmsprop", "mini", n, long, seed + threads[2:] + ("train.py-2t",), 0.8),
        Regime("online-sgd", f"sgd lr 0.01, batch 1, first {online_n}", "sgd", "online", online_n, short, threads, 1.0),
        Regime(
            "online-rmsprop",
            f"rmsprop, batch 1, first {online_n}",
            "rmsprop",
            "online",
            online_n,
            short,
            ("plain", "descent", "descent-compiled"),
            1.0,
        ),
        Regime("full-batch", "sgd lr 0.01, batch = all", "sgd", "full", n, long, ("plain", "descent"), 1.1),
        # one other CPU-bound process beside each job; targets: <= BUSY x the same row quiet
        Regime(
            "busy-seed",
            "rmsprop, batch 128, one core taken",
            "rmsprop",
            "mini",
            2048 if quick else 30000,
            short,
            threads,
            0.8,
            busy=True,
        ),
        Regime(
            "busy-online-sgd",
            f"sgd lr 0.01, batch 1, first {online_n}, one core taken",
            "sgd",
            "online",
            online_n,
            short,
            threads,
            1.0,
            busy=True,
        ),
    ]
    # the other networks (not in --quick: the suite's smoke test stays as it was)
    networks = [
        Regime(
            "cnn",
            "the book's convnet, rmsprop, batch 128, first 6000",
            "rmsprop",
            "mini",
            6000,
            3,
            ("plain", "descent"),
            1.05,
            model="cnn",
        ),
        Regime(
            "linear-online",
            "softmax regression, sgd lr 0.01, batch 1, first 2000",
            "sgd",
            "online",
            2000,
            4,
            ("plain", "descent"),
            1.05,
            model="linear",
        ),
    ]
    return (gpus if gpu else []) + cpu + ([] if quick else networks)


@dataclass
class Row:
    regime: Regime
    contender: str
    seconds: list[float] = field(default_factory=list)  # per timed epoch
    updates: list[int] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # other processes' share of the cores, per timed epoch
    extra: dict[str, list] = field(default_factory=dict)

    def add(self, result: dict, warmup: int = 1) -> None:
        self.seconds += result["seconds"][warmup:]
        self.updates += result["updates"][warmup:]
        self.others += result["others"][warmup:]
        for k, v in result.items():
            if k not in ("seconds", "updates", "others"):
                self.extra.setdefault(k, []).append(v)

    @property
    def ms_per_update(self) -> list[float]:
        return [1000 * s / u for s, u in zip(self.seconds, self.updates)]

    def median_epoch(self) -> float:
        """Seconds per epoch of all 60000 examples, extrapolated from the subset when the regime uses one."""
        n = self.regime.limit or 60000
        return statistics.median(s * 60000 / n for s in self.seconds)

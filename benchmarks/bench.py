"""descent's loop against the plain PyTorch loop and Keras 3, on the MNIST runs of ch. 2 (and on the convnet
and softmax regression).

    make bench                                   # full run: ~10 minutes on 2 cores
    make bench ARGS="--quick --no-keras"         # smoke test: tiny sizes, under a minute
    make bench ARGS="--threads 1 --out FILE"     # the policy rows at one intra-op thread
    make bench ARGS="--only seed,online-sgd,busy-seed,busy-online-sgd"   # the thread policy's rows
    make bench ARGS="--only checkpoints"         # the seed run's checkpoints on sqlite and a tracking server
    make bench ARGS="--only cnn,linear-online --no-keras"   # the other networks against the plain loop

How it measures (the same on every row):
- every (regime, contender) trains in a fresh subprocess on the real MNIST cache: one warm-up epoch
  (the first iterations in a process are several times slower here), then timed epochs; the set runs
  `--rounds` times with the contender order reversed each round, and the table gives medians over
  all timed epochs. --quick runs the torch jobs in one process per wait policy and load instead (faster,
  memory less clean).
- same model (descent.nets.MLP, or the row's conf/model option; keras init, seed 0), same data order
  (descent.data.epoch_permutation), same hyperparameters (conf/optimizer/*.yaml); flush-denormal on for
  descent and the plain loop.
- descent = src/train.py's own run: descent.pipeline.build(cfg, hc) on the config src/train.py composes from
  conf/ with the shipped defaults (a real MLflow run on a temporary sqlite store, system metrics, checkpoints
  written and uploaded off the training thread, the gradient noise scale at each validation point, the progress
  bar as it is off a terminal; the model is not logged after the test, as UNTIMED says), then pipeline.fit and
  pipeline.finish; its time is the Classifier's own clock
  (train_seconds, the run's progress/seconds: from on_train_epoch_start to the epoch's last update, lightning's
  per-chunk overhead included, validation and measurements excluded). descent-bare: the same build with the noise
  scale, system metrics, checkpoint upload and bar off. train.py (seed row) = the whole `python src/train.py`
  command with the job's overrides, timed by the run's own progress/seconds (read back from MLflow at each
  epoch's end): where it and descent agree, the bench times what users run.
- plain = descent.engine.reference.plain_train with torch's default optimizer (for-loop, not fused, eager).
- with CUDA, gpu-* rows (--no-gpu skips them): descent as configured (trainer.cuda_graphs=auto: one CUDA
  graph replay per update), descent-eager (cuda_graphs=false), plain on the GPU, and bare-graph: a
  captured loop with nothing around it (no lightning, no metrics), the floor for descent's graph path.
  GPU times are taken after torch.cuda.synchronize(); descent's clock stops at its last log point of
  the epoch, which reads the device (a sync).
- peak memory = the process's resident-set high-water mark (VmHWM) over the job, and in brackets its
  growth over the resident set after imports (torch + lightning alone hold ~900 MiB here).
- threads: plain, descent and their variants run at descent's thread policy (descent/engine/threads.py: the
  intra-op threads it chooses for the regime's batch size on this machine, GOMP_SPINCOUNT=1000);
  plain-2t and descent-2t at 2 intra-op threads with OpenMP's default wait policy (torch's default on
  a 2-core machine, and descent's before the policy); Keras as a user gets it. The table names each row's.
- busy-* rows run the same jobs while one other CPU-bound process (`python -c 'while True: pass'`,
  started before the job and killed after it) holds a core: a parallel sweep, a second user, CI.
- other processes' share of the cores is measured over every timed epoch (/proc/stat); rows where it
  was high are flagged CONTENDED (busy-* rows: beyond their own competitor's core). Before each job the
  run waits a little for the machine to go quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SEED = 0
CONTENDED = 0.2  # other processes' median share of the cores above which a row's timing is flagged
BUSY = 1.3  # issue 20: a busy-* row's median <= this x the same contender's quiet median
TODAY = 0.75  # issue 20: online SGD at the thread policy <= this x at 2 threads (descent-2t)
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
    online_n = 100 if quick else 2000
    # issue 11's targets on an H200, as ratios to the plain loop it measured there (0.734 s/epoch seed,
    # 0.99 ms/update online); full batch: <= 1.5x plain
    graph, gpu_n = ("plain", "descent", "descent-eager", "bare-graph"), 500 if quick else 10000
    gpus = (
        [
            Regime(
                "gpu-seed",
                "rmsprop, batch 128, CUDA; H200 target 0.10 s/epoch",
                "rmsprop",
                "mini",
                2048 if quick else None,
                3 if quick else 6,
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
                3 if quick else 4,
                graph,
                0.071,
                "cuda",
            ),
            Regime(
                "gpu-full-batch",
                "sgd lr 0.01, batch = all, CUDA",
                "sgd",
                "full",
                2048 if quick else None,
                3 if quick else 6,
                graph,
                1.5,
                "cuda",
            ),
        ]
        if gpu
        else []
    )
    threads = ("plain", "descent", "plain-2t", "descent-2t")  # issue 20: the thread policy against 2 threads
    return (
        gpus
        + [
            Regime(
                "seed",
                "rmsprop, batch 128",
                "rmsprop",
                "mini",
                2048 if quick else None,
                3 if quick else 5,
                seed + threads[2:],
                0.8,
            ),
            Regime(
                "online-sgd",
                f"sgd lr 0.01, batch 1, first {online_n}",
                "sgd",
                "online",
                online_n,
                3 if quick else 4,
                threads,
                1.0,
            ),
            Regime(
                "online-rmsprop",
                f"rmsprop, batch 1, first {online_n}",
                "rmsprop",
                "online",
                online_n,
                3 if quick else 4,
                ("plain", "descent", "descent-compiled"),
                1.0,
            ),
            Regime(
                "full-batch",
                "sgd lr 0.01, batch = all",
                "sgd",
                "full",
                2048 if quick else None,
                3 if quick else 5,
                ("plain", "descent"),
                1.1,
            ),
            # one other CPU-bound process beside each job; targets: <= BUSY x the same row quiet
            Regime(
                "busy-seed",
                "rmsprop, batch 128, one core taken",
                "rmsprop",
                "mini",
                2048 if quick else 30000,
                3 if quick else 4,
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
                3 if quick else 4,
                threads,
                1.0,
                busy=True,
            ),
        ]
        + (
            []
            if quick
            else [  # issue 19's other networks (not in --quick: the suite's smoke test stays as it was)
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
        )
    )


# ---------------------------------------------------------------------------------------------
# the worker: runs jobs in this process and writes one JSON result per job


def rss_mib(field_name: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Others:
    """CPU that other processes (and the hypervisor's steal) took while we ran, as a share of all cores.

    /proc/stat's busy time minus this process's own CPU time, between two calls of share(). On a shared
    2-core machine this is what explains an outlier: 2 intra-op threads wait on each other at every
    parallel op, and one of them descheduled costs a whole time slice.
    """

    def __init__(self):
        self.last = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy, time.process_time()

    def share(self) -> float:
        (w0, b0, own0), (w1, b1, own1) = self.last, self.sample()
        self.last = (w1, b1, own1)
        return max(0.0, (b1 - b0) - (own1 - own0)) / max(w1 - w0, 1e-9) / os.cpu_count()


def reset_peak_rss() -> bool:
    try:  # linux >= 4.0: "5" resets VmHWM to the current resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def flush_denormal() -> None:
    import numpy as np
    import torch

    np.finfo(np.float32), np.finfo(np.float64)  # as Classifier.on_fit_start: numpy caches its limits first
    torch.set_flush_denormal(True)


def over_budget(job: dict, start: float) -> bool:
    """The job has used its share of the run's time (checked after warm-up + 1 timed epoch)."""
    return bool(job.get("budget")) and time.perf_counter() - start > job["budget"]


# what each descent contender changes from the shipped defaults (conf/train.yaml); "descent" changes nothing
VARIANTS = {
    "descent-compiled": ["trainer.compile_optimizer=true"],
    "descent-eager": ["trainer.cuda_graphs=false"],
    # what a whole run adds beyond the loop, off: the noise scale, system metrics, checkpoints, the bar
    "descent-bare": [
        "trainer.noise_scale=false",
        "logger.system_metrics=false",
        "logger.log_checkpoint=false",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every_seconds=1000000000",
    ],
}


# the one change from the shipped defaults in every descent row: the model logged after the test takes seconds per job
# (mlflow.pytorch) and lies outside every timed epoch
UNTIMED = ["logger.log_model=false"]


def compose(job: dict):
    """The job's config and its Hydra config, as `python src/train.py <overrides>` composes them."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = [
        f"model={job.get('model', 'mlp')}",
        f"optimizer={job['optimizer']}",
        f"batching={job['batching']}",
        f"seed={SEED}",
        f"data.root={job['data']}",
        f"data.limit_train={job['limit'] if job['limit'] else 'null'}",
        f"trainer.max_epochs={job['epochs']}",
        "logger.experiment_name=bench",
        *UNTIMED,
    ] + VARIANTS.get(job["contender"].removesuffix("-2t"), [])
    if job["threads"] != "policy":  # build() applies trainer.threads (descent/engine/threads.py)
        overrides.append(f"trainer.threads={job['threads']}")
    os.environ["MLFLOW_TRACKING_URI"] = job["store"]  # conf/train.yaml's logger.tracking_uri reads it
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    out = Path(job["result"]).with_suffix("")  # the run's output folder, as hydra.run.dir
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir, cfg.hydra.runtime.cwd = str(out), str(out.parent)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    out.mkdir(parents=True, exist_ok=True)
    return cfg


def accuracy(net, x, y) -> float:
    import torch

    with torch.no_grad():
        net.eval()
        correct = sum(int((net(x[i : i + 8192]).argmax(1) == y[i : i + 8192]).sum()) for i in range(0, len(x), 8192))
        net.train()
    return correct / len(x)


def run_plain(job: dict, cfg) -> dict:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import descent.engine.reference as reference
    from descent.data import ensure_data, epoch_permutation, load_split

    ensure_data(cfg.data.root, download=False)
    device = torch.device(job.get("device", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x, y = load_split(cfg.data.root, train=True)
    n = cfg.data.limit_train or len(x)
    x, y = x[:n].contiguous().to(device), y[:n].to(device)
    batch = cfg.data.batch_size or n
    torch.manual_seed(cfg.seed)  # what pl.seed_everything does for torch: the same initial weights
    net = instantiate(cfg.model).to(device)
    # torch's default implementation (on CPU the for-loop one): drop the config's `fused: true`
    hyper = {k: v for k, v in OmegaConf.to_container(cfg.optimizer).items() if k not in ("fused", "foreach")}
    optimizer = instantiate(hyper)(net.parameters())
    flush_denormal()

    seconds, updates, others = [], [], []
    start = time.perf_counter()
    for epoch in range(cfg.trainer.max_epochs):
        if epoch >= 2 and over_budget(job, start):
            break
        # plain_train(epochs=1) asks for epoch 0's order; answer with epoch `epoch`'s, so that the plain loop
        # visits the same order as descent's epoch (its code is untouched, and no copy of the data is made)
        reference.epoch_permutation = lambda n, seed, _, device="cpu", e=epoch: epoch_permutation(n, seed, e, device)
        busy = Others()
        sync()
        tic = time.perf_counter()
        k = reference.plain_train(net, optimizer, x, y, batch_size=batch, epochs=1, seed=cfg.seed)
        sync()
        seconds.append(time.perf_counter() - tic)
        updates.append(k)
        others.append(busy.share())
    reference.epoch_permutation = epoch_permutation
    result = {"seconds": seconds, "updates": updates, "others": others}
    if job["regime"].endswith("seed"):
        xt, yt = load_split(cfg.data.root, train=False)
        result["test_acc"] = accuracy(net, xt.to(device), yt.to(device))
    return result


def run_bare_graph(job: dict, cfg) -> dict:
    """Issue 11's "whole step in one CUDA graph": capture per batch shape, replay per update, nothing else."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from descent.data import ensure_data, epoch_permutation, load_split
    from descent.engine.graphs import optimizer_kwargs

    ensure_data(cfg.data.root, download=False)
    device = torch.device("cuda")
    x, y = load_split(cfg.data.root, train=True)
    n = cfg.data.limit_train or len(x)
    x, y = x[:n].contiguous().to(device), y[:n].to(device)
    batch = cfg.data.batch_size or n
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model).to(device)
    make = instantiate(cfg.optimizer)
    opt = make(net.parameters(), **optimizer_kwargs(make, capture=True))

    def step(index):
        F.cross_entropy(net(x[index]), y[index]).backward()
        opt.step()

    graphs = {}
    for size in {batch, n % batch} - {0}:  # warm-up steps train too: this loop's weights are not compared
        index = torch.arange(size, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(index)
                opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        graphs[size] = (index, torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[size][1]):
            step(index)

    seconds, updates, others = [], [], []
    start = time.perf_counter()
    for epoch in range(cfg.trainer.max_epochs):
        if epoch >= 2 and over_budget(job, start):
            break
        busy = Others()
        torch.cuda.synchronize()
        tic = time.perf_counter()
        perm = epoch_permutation(n, cfg.seed, epoch, device)
        for i in range(0, n, batch):
            index, graph = graphs[min(batch, n - i)]
            index.copy_(perm[i : i + batch])
            graph.replay()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tic)
        updates.append(-(-n // batch))
        others.append(busy.share())
    return {"seconds": seconds, "updates": updates, "others": others}


def run_descent(job: dict, cfg) -> dict:
    import pytorch_lightning as pl

    from descent.tracking import names

    class EpochClock(pl.Callback):
        """Reads the Classifier's clock and update count at each epoch boundary; times the first compiled steps."""

        def __init__(self):
            self.marks, self.wall, self.others, self.compile_s, self.calls = [], [], [], 0.0, 0
            self.busy, self.start = Others(), time.perf_counter()

        def on_train_start(self, trainer, module):
            if not module.compile_optimizer:
                return
            compiled = module.opt_step

            def first_steps(*args, **kwargs):  # compiling happens inside the first calls (state init, then steady)
                tic = time.perf_counter()
                out = compiled(*args, **kwargs)
                if self.calls < 3:
                    self.compile_s += time.perf_counter() - tic
                    self.calls += 1
                    if self.calls == 3:
                        module.opt_step = compiled
                return out

            module.opt_step = first_steps

        def on_train_epoch_start(self, trainer, module):  # runs before the module's hook: the last epoch is closed
            self.mark(module)

        def on_train_epoch_end(self, trainer, module):  # the epoch still ends whole; lightning stops after it
            if trainer.current_epoch >= 1 and over_budget(job, self.start):
                trainer.should_stop = True

        def on_train_end(self, trainer, module):
            self.mark(module)

        def mark(self, module):
            self.marks.append((module.train_seconds, module.updates))
            self.wall.append(time.perf_counter())
            self.others.append(self.busy.share())

    def timed(logger, name: str) -> None:
        """Add the time spent in logger.<name> (outermost calls only) to logger.bench_seconds."""
        fn = getattr(logger, name)

        def wrapper(*args, **kwargs):
            logger.bench_depth += 1
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                logger.bench_depth -= 1
                if logger.bench_depth == 0:
                    logger.bench_seconds += time.perf_counter() - tic

        setattr(logger, name, wrapper)  # an instance attribute: self.flush() inside the logger finds it too

    from hydra.core.hydra_config import HydraConfig

    from descent import pipeline

    clock = EpochClock()
    run = pipeline.build(cfg, HydraConfig.get(), callbacks=(clock,))  # what `python src/train.py` runs
    module, logger = run.module, run.logger
    logger.bench_seconds, logger.bench_depth = 0.0, 0
    for name in ("log_metrics", "flush", "save"):  # MLflow's share of the training time
        timed(logger, name)
    measure_seconds = [0.0]
    for i, one in enumerate(module.measures):  # the noise scale's share (shipped on: at each validation point)

        def timed_measure(*args, one=one, **kwargs):
            tic = time.perf_counter()
            try:
                return one(*args, **kwargs)
            finally:
                measure_seconds[0] += time.perf_counter() - tic

        module.measures[i] = timed_measure
    tic = time.perf_counter()
    pipeline.fit(run)  # fit, the sample image and the test, as src/train.py
    fit_s = time.perf_counter() - tic
    pipeline.finish(run)

    marks = clock.marks
    result = {
        "seconds": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "updates": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "wall_seconds": [b - a for a, b in zip(clock.wall, clock.wall[1:])],
        "others": clock.others[1:],
        "fit_seconds": fit_s,
    }
    if module.compile_optimizer:
        result["compile_seconds"] = clock.compile_s
    result.update(
        logger_seconds=logger.bench_seconds, train_seconds=module.train_seconds, measure_seconds=measure_seconds[0]
    )
    if job["regime"].endswith("seed"):
        result["test_acc"] = module.test_metrics[names.TEST_ACC]
    return result


def worker(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    import torch  # noqa: F401  (imports first: the baseline below is "torch and friends loaded")
    import pytorch_lightning  # noqa: F401

    import descent.data  # noqa: F401
    import descent.engine.loop  # noqa: F401

    from descent.engine import threads

    for job in jobs:
        cfg = compose(job)
        # the thread policy's count for this regime on this machine (as src/train.py applies it), or a fixed one
        torch.set_num_threads(
            threads.choose(threads.batch_size(cfg), threads.cpus_granted())
            if job["threads"] == "policy"
            else job["threads"]
        )
        base = rss_mib("VmRSS")
        clean = reset_peak_rss()
        run = {"plain": run_plain, "bare-graph": run_bare_graph}.get(job["contender"].removesuffix("-2t"), run_descent)
        result = run(job, cfg)
        result.update(
            peak_rss_mib=rss_mib("VmHWM") if clean else float("nan"),
            base_rss_mib=base,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            wait_policy=threads.wait_policy(os.environ),
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            interop_threads=torch.get_num_interop_threads(),
        )
        Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the driver


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


def wait_quiet(max_seconds: float, threshold: float = 0.15) -> float:
    """Wait (up to max_seconds) for a second in which other processes use < threshold of the cores."""
    tic = time.perf_counter()
    busy = Others()
    while time.perf_counter() - tic < max_seconds:
        time.sleep(1.0)
        if busy.share() < threshold:
            break
    return time.perf_counter() - tic


def run_checked(args: list[str], env: dict, timeout: float, what: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd: a temporary folder, so that nothing (MLflow's ./mlruns artifacts above all) lands in the project
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def competitor(busy: bool):
    """One other CPU-bound process beside the busy-* rows' jobs, started before the job, killed after it."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def run_jobs(jobs: list[dict], tmp: Path, env: dict) -> None:
    """Jobs in one worker process; they share its OpenMP wait policy (read once per process) and load."""
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    what = ", ".join(f"{j['regime']}/{j['contender']}" for j in jobs)
    env = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if jobs[0]["wait_policy"]:  # the policy's spin (the worker imports torch before descent could set it)
        env["GOMP_SPINCOUNT"] = jobs[0]["wait_policy"]
    with competitor(jobs[0]["busy"]):
        run_checked([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], env, 1200, what, tmp)


def run_keras(job: dict, tmp: Path, env: dict) -> None:
    run_checked(
        [
            sys.executable,
            str(HERE / "keras_seed.py"),
            "--data",
            job["data"],
            "--epochs",
            str(job["epochs"]),
            "--limit",
            str(job["limit"] or 0),
            "--seed",
            str(SEED),
            "--budget",
            str(job["budget"]),
            "--out",
            job["result"],
        ],
        {**env, "KERAS_BACKEND": "torch"},
        1200,
        "keras",
        tmp,
    )


def run_whole(job: dict, tmp: Path, env: dict) -> None:
    """`python src/train.py` as a user types it, the job's config on the command line: its epochs timed by its own
    progress/seconds (read back from the run's MLflow history at each epoch's end), as the descent row's clock."""
    import resource

    from mlflow import MlflowClient

    from descent.tracking import names

    run_dir = Path(job["result"]).with_suffix("")
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        f"optimizer={job['optimizer']}",
        f"batching={job['batching']}",
        f"model={job['model']}",
        f"seed={SEED}",
        f"data.root={job['data']}",
        f"data.limit_train={job['limit'] or 'null'}",
        f"trainer.max_epochs={job['epochs']}",
        "logger.experiment_name=bench-train.py",
        f"hydra.run.dir={run_dir}",
        *UNTIMED,
    ]
    busy, tic = Others(), time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=tmp,
        env={**env, "MLFLOW_TRACKING_URI": job["store"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = proc.communicate(timeout=1200)[0]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss: the largest child so far (this run, or a worker)
    if proc.returncode != 0:
        sys.exit(f"src/train.py failed ({proc.returncode}):\n{output[-3000:]}")
    wall, share = time.perf_counter() - tic, busy.share()  # share: all but the bench's own process, the run included
    child = (cpu.ru_utime + cpu.ru_stime) - getattr(run_whole, "cpu", 0.0)  # this run's CPU seconds
    run_whole.cpu = cpu.ru_utime + cpu.ru_stime
    client, run_id = MlflowClient(job["store"]), (run_dir / "mlflow_run_id").read_text().strip()
    history = {
        k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
        for k in (names.EPOCH, names.SECONDS, names.UPDATES)
    }
    ends = [0] + sorted(step for step, epoch in history[names.EPOCH].items() if epoch == int(epoch) and epoch > 0)
    at = {k: [history[k].get(step, 0.0) for step in ends] for k in (names.SECONDS, names.UPDATES)}
    others = max(0.0, share - child / wall / os.cpu_count())
    Path(job["result"]).write_text(
        json.dumps(
            {
                "seconds": [b - a for a, b in zip(at[names.SECONDS], at[names.SECONDS][1:])],
                "updates": [int(b - a) for a, b in zip(at[names.UPDATES], at[names.UPDATES][1:])],
                "others": [others] * (len(ends) - 1),
                "peak_rss_mib": cpu.ru_maxrss / 1024,
                "base_rss_mib": float("nan"),
                "test_acc": client.get_run(run_id).data.metrics[names.TEST_ACC],
            }
        )
    )


def first_update_seconds(runs: int, data: str, tmp: Path, env: dict) -> tuple[list[float], list[float]]:
    """`python src/train.py ...` as a user types it: seconds from process start to the first update, and to exit."""
    firsts, walls = [], []
    run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'startup' / 'mlflow.db'}"}
    (tmp / "startup").mkdir(exist_ok=True)
    for i in range(runs):
        run_dir = tmp / "startup" / f"run{i}"
        args = [
            sys.executable,
            str(ROOT / "src" / "train.py"),
            "trainer.max_epochs=1",
            "data.limit_train=1024",
            "trainer.progress_bar=false",
            "logger.log_checkpoint=false",
            f"data.root={data}",
            f"hydra.run.dir={run_dir}",
        ]
        tic = time.perf_counter()
        proc = run_checked(args, run_env, 600, "src/train.py", tmp / "startup")
        walls.append(time.perf_counter() - tic)
        text = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
        match = FIRST_UPDATE.search(text)
        if not match:
            sys.exit(f"src/train.py did not log 'first update ... s after the process started':\n{text[-3000:]}")
        firsts.append(float(match.group(1)))
    return firsts, walls


CHECKPOINT_TARGET = 1.03  # issue 20: the seed run with checkpoints uploaded <= this x the same run without


def checkpoint_costs(rounds: int, data: str, tmp: Path, env: dict, quick: bool) -> list[str]:
    """The seed run through src/train.py (MLflow, checkpoints as shipped) with logger.log_checkpoint true and
    false, on a sqlite store and on a tracking server (descent.services.server, PostgreSQL + MLflow, started here and
    stopped after); training seconds per epoch (the run's progress/seconds), medians over the rounds."""
    from mlflow import MlflowClient

    from descent.services import server

    epochs, limit = (2, 8192) if quick else (3, None)
    state = Path(tempfile.mkdtemp(prefix="descent-bench-server-"))  # PostgreSQL's own user must reach it
    state.chmod(0o755)
    stores = {"sqlite": f"sqlite:///{tmp / 'checkpoints' / 'mlflow.db'}"}
    lines = [
        "| store | log_checkpoint=true, s / epoch | false, s / epoch | x without | target | runs |",
        "|---|---|---|---|---|---|",
    ]
    (tmp / "checkpoints").mkdir(exist_ok=True)
    try:
        print("checkpoints: starting a tracking server", file=sys.stderr, flush=True)
        stores["server"] = server.start(state, free_port())
        for name, uri in stores.items():
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for rnd in range(rounds):
                for upload in (True, False) if rnd % 2 == 0 else (False, True):
                    print(f"checkpoints: {name}, log_checkpoint={upload}", file=sys.stderr, flush=True)
                    run_dir = tmp / "checkpoints" / f"{name}-{upload}-{rnd}"
                    args = [
                        sys.executable,
                        str(ROOT / "src" / "train.py"),
                        f"trainer.max_epochs={epochs}",
                        f"data.limit_train={limit or 'null'}",
                        f"logger.log_checkpoint={str(upload).lower()}",
                        "logger.log_model=false",
                        f"data.root={data}",
                        f"hydra.run.dir={run_dir}",
                        f"logger.experiment_name=bench-checkpoints-{name}",
                    ]
                    run_checked(args, {**env, "MLFLOW_TRACKING_URI": uri}, 900, "src/train.py", tmp / "checkpoints")
                    run_id = (run_dir / "mlflow_run_id").read_text().strip()
                    seconds[upload].append(MlflowClient(uri).get_run(run_id).data.metrics["progress/seconds"] / epochs)
            on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
            lines.append(
                f"| {name} | {fmt(on)} | {fmt(off)} | {on / off:.3f} | {verdict(on / off, CHECKPOINT_TARGET, 'without')} "
                f"| {len(seconds[True])} + {len(seconds[False])} |"
            )
    finally:
        server.stop(state)
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    return [
        f"Checkpoints: the seed run{' on 8192 examples' if quick else ''}, {epochs} epochs, through `src/train.py` "
        "(a checkpoint at every epoch end and every 30 s, written and uploaded off the training thread)",
        "",
        *lines,
        "",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        + "; flush-denormal on for descent and the plain loop, set as descent sets it (after the data is loaded;"
        " torch's flag is per thread, so it reaches the main thread only)"
        + (
            f"; keras {info['keras']} (torch backend, flush-denormal off: as a user gets it)"
            if "keras" in info
            else "; Keras not run (--no-keras, or not installed: pip install -e '.[bench]')"
        ),
        f"- load average at start / end: {info['load_start']} / {info['load_end']} (another user shares this machine)",
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
            vs_keras = epoch / keras.median_epoch() if keras else float("nan")
            peaks, bases = row.extra.get("peak_rss_mib", [float("nan")]), row.extra.get("base_rss_mib", [float("nan")])
            peak = max(peaks)
            grown = max(p - b for p, b in zip(peaks, bases))
            acc = statistics.median(row.extra["test_acc"]) if "test_acc" in row.extra else float("nan")
            target = ""
            quiet = rows.get((reg.key.removeprefix("busy-"), name))
            today = rows.get((reg.key, name + "-2t"))
            if reg.busy and quiet:  # issue 20: one core taken costs <= BUSY x
                target = verdict(per_update / statistics.median(quiet.ms_per_update), BUSY, "quiet")
            elif name in ("descent", "train.py", "descent-compiled"):
                target = verdict(ratio, reg.target, "plain")
                if reg.key == "seed" and keras:
                    target += "; " + verdict(vs_keras, 0.5, "Keras")
            if not reg.busy and reg.batching == "online" and today:  # issue 20: the policy's one thread vs 2
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


def overheads(rows: dict[tuple[str, str], Row], firsts: list[float], walls: list[float]) -> list[str]:
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
            + " | `src/train.py trainer.max_epochs=1 data.limit_train=1024` (descent's own log line); whole command "
            f"{statistics.median(walls):.1f} s; the first run creates the sqlite store |"
        )
    return lines + [""] if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one worker process: a smoke test (< 60 s)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras 3 contender")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument(
        "--rounds",
        type=int,
        help="repetitions of the whole set, contender order reversed each time (default 2, --quick 1)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        help="seconds in all that the run may spend waiting, before jobs (15 s "
        "at most each), for the other processes on this machine to go quiet (default 60, --quick 0)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads for plain, descent and their variants (default: "
        "descent/engine/threads.py's choice per regime); the -2t rows stay at 2, Keras at torch's default",
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run (default 540, --quick: no limit): "
        "under load, jobs stop after fewer timed epochs (at least one) to stay within it",
    )
    p.add_argument(
        "--only",
        help="comma-separated regimes to run (seed, online-sgd, online-rmsprop, full-batch, "
        "busy-seed, busy-online-sgd, cnn, linear-online, startup, checkpoints, and with CUDA gpu-seed, "
        "gpu-online-sgd, gpu-full-batch); default all",
    )
    p.add_argument("--no-gpu", action="store_true", help="skip the gpu-* rows even where CUDA is available")
    p.add_argument(
        "--data",
        type=lambda d: str(Path(d).resolve()),
        default=str(ROOT / "data"),
        help="MNIST root (IDX files under <data>/MNIST/raw)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    t_start = time.perf_counter()
    started = datetime.datetime.now().astimezone()
    keras = not args.no_keras and _has_keras()
    rounds = args.rounds or (1 if args.quick else 2)
    if args.budget is None:
        args.budget = 0 if args.quick else 540
    max_wait = args.max_wait if args.max_wait is not None else (0 if args.quick else 60)
    waited = 0.0
    only = set(args.only.split(",")) if args.only else None
    gpu = not args.no_gpu and _has_cuda()
    regs = [r for r in regimes(args.quick, keras, gpu) if only is None or r.key in only]
    rows = {(r.key, c): Row(r, c) for r in regs for c in r.contenders}
    info: dict = {"load_start": open("/proc/loadavg").read().split()[0]}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH")] if p),
    }
    from descent.engine.threads import SPIN_COUNT  # (importing descent puts it in this process's environment too)

    with tempfile.TemporaryDirectory(prefix="descent-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        schedule = [
            (rnd, reg, name)
            for rnd in range(rounds)
            for reg in regs
            for name in (reg.contenders if rnd % 2 == 0 else reg.contenders[::-1])
        ]
        startup_runs = 0 if only is not None and "startup" not in only else 1 if args.quick else 3
        deadline = time.perf_counter() + args.budget - 20 * startup_runs if args.budget else None
        pending = []
        for i, (rnd, reg, name) in enumerate(schedule):
            if max_wait > waited:
                waited += wait_quiet(min(15.0, max_wait - waited))
            # what is left of the run's budget, shared by the jobs still to come (never below warm-up + 1 epoch)
            budget = max(0.0, (deadline - time.perf_counter()) / (len(schedule) - i)) if deadline else 0.0
            result_path = tmp / f"{reg.key}-{name}-{rnd}.json"
            job = {
                "regime": reg.key,
                "contender": name,
                "model": reg.model,
                "optimizer": reg.optimizer,
                "batching": reg.batching,
                "limit": reg.limit,
                "epochs": reg.epochs,
                "data": args.data,
                "store": store,
                "device": reg.device,
                "budget": budget,
                "result": str(result_path),
                "busy": reg.busy,
                # the thread policy's rows, or torch's threads as they were before it (2 on 2 cores)
                "threads": 2 if name.endswith("-2t") else args.threads or "policy",
                "wait_policy": None if name.endswith("-2t") else str(SPIN_COUNT),
            }
            if name in ("keras", "train.py"):  # a process of its own, also with --quick
                print(f"round {rnd + 1}/{rounds}: {reg.key} / {name}", file=sys.stderr, flush=True)
                with competitor(reg.busy):
                    (run_keras if name == "keras" else run_whole)(job, tmp, env)
            elif args.quick:  # the torch jobs in a few processes (one per wait policy and load), after the loop
                pending.append(job)
                continue
            else:  # one process per job: a clean peak-memory reading, no state shared
                print(f"round {rnd + 1}/{rounds}: {reg.key} / {name}", file=sys.stderr, flush=True)
                run_jobs([job], tmp, env)
        groups: dict[tuple, list] = {}  # one process per wait policy and load
        for job in pending:
            groups.setdefault((job["busy"], job["wait_policy"]), []).append(job)
        for group in groups.values():
            print(f"{len(group)} jobs in one process", file=sys.stderr, flush=True)
            run_jobs(group, tmp, env)
        for rnd, reg, name in schedule:
            result = json.loads((tmp / f"{reg.key}-{name}-{rnd}.json").read_text())
            info.update({k: result.pop(k) for k in ("torch", "interop_threads", "keras", "gpu") if k in result})
            rows[reg.key, name].add(result)

        firsts = walls = []
        if only is None or "startup" in only:
            print("start-up: src/train.py", file=sys.stderr, flush=True)
            firsts, walls = first_update_seconds(1 if args.quick else 3, args.data, tmp, env)
        checkpoints = []  # --quick (the suite's smoke test) runs them only when asked: a server and 4+ runs
        if (only is None and not args.quick) or (only is not None and "checkpoints" in only):
            checkpoints = checkpoint_costs(rounds, args.data, tmp, env, args.quick)
    info["load_end"] = open("/proc/loadavg").read().split()[0]

    command = "python benchmarks/bench.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = [
        f"# descent benchmark, {started:%Y-%m-%d %H:%M %Z}",
        "",
        f"`{command}` — {rounds} round(s), {time.perf_counter() - t_start:.0f} s in all "
        f"({waited:.0f} s of it waiting for other processes to go quiet)",
        "",
        *machine(info),
        "",
        *contention(rows),
        *table(rows, regs),
        "",
        *overheads(rows, firsts, walls),
        *checkpoints,
        "Times: descent = Classifier.train_seconds per epoch in src/train.py's own build (lightning's per-chunk "
        "overhead included; 'lightning wall' = epoch start to epoch start, from a Callback); train.py = the whole "
        "command's progress/seconds between epoch ends; plain = around plain_train(epochs=1); "
        "Keras = a Callback's perf_counter from on_epoch_begin to on_epoch_end. Online rows time a subset and "
        "extrapolate s/epoch to 60000 examples. Medians over timed epochs after one warm-up epoch per process.",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _has_cuda() -> bool:
    import torch  # ~2 s in the driver, which otherwise stays light

    return torch.cuda.is_available()


def _has_keras() -> bool:
    import importlib.util

    return importlib.util.find_spec("keras") is not None


if __name__ == "__main__":
    main()

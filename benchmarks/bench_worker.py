"""The benchmark's worker: runs the jobs bench.py hands it in this process (descent, the plain loop, the bare graph)
and writes one JSON result per job. bench.py --worker FILE starts it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench_regimes import ROOT, SEED


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
    from descent.engine.loop import flush_subnormals

    flush_subnormals()  # as pipeline.build: before anything can start torch's threads
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
    """The "whole step in one CUDA graph" floor: capture per batch shape, replay per update, nothing else."""
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

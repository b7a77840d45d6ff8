"""Each optimizer's cost per update against plain SGD's: the plain loop (descent.engine.reference.plain_train), the
optimizers as conf/optimizer/*.yaml builds them, on the real MNIST cache.

    python benchmarks/optimizer_cost.py                      # ~3 min on 2 cores
    python benchmarks/optimizer_cost.py --rounds 1 --updates 20 --full-steps 2   # smoke test

- batch 128: milliseconds per update (forward, backward, step) for sgd, sgd_momentum, adam, adamw, muon;
- full batch (data.val_size=10000: 50000 examples, as the studies): seconds per update for sgd and lbfgs,
  with L-BFGS's evaluations of the batch per update (its closure calls: line search included).
Each (optimizer, batch) times `--updates` updates after as many warm-up ones, `--rounds` times, the order
reversed each round; the table gives medians and the ratio to sgd's median at the same batch size. Same
model (descent.nets.MLP, keras init, seed 0), data order, flush-denormal, intra-op threads and OpenMP
wait policy (descent/engine/threads.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from descent.engine import threads

threads.set_wait_policy()  # descent's OpenMP wait, before torch loads libgomp

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate

from descent.data import ensure_data, load_split  # noqa: E402
from descent.nets.optim import needs_closure  # noqa: E402
from descent.engine.reference import plain_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINI = ("sgd", "sgd_momentum", "adam", "adamw", "muon")
FULL = ("sgd", "lbfgs")


def optimizer(name: str, net):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return instantiate(compose("train", overrides=[f"optimizer={name}"]).optimizer)(net.named_parameters())


class Counted:
    """The optimizer, stepped as plain_train steps it (evaluations = updates)."""

    def __init__(self, opt):
        self.opt, self.evaluations = opt, 0

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self, closure=None):
        self.evaluations += 1
        return self.opt.step()


class ClosureCounted(Counted):
    """L-BFGS: plain_train hands it a closure (needs_closure); each call is one evaluation of the batch."""

    def step(self, closure):
        def counted():
            self.evaluations += 1
            return closure()

        return self.opt.step(counted)


def time_updates(name: str, x, y, batch_size: int, updates: int) -> tuple[float, float]:
    """Seconds per update and evaluations per update, over `updates` updates after as many warm-up ones."""
    torch.set_num_threads(threads.choose(batch_size, threads.cpus_granted()))  # as train.py would
    torch.manual_seed(0)
    net = instantiate({"_target_": "descent.nets.MLP"})
    inner = optimizer(name, net)
    opt = (ClosureCounted if needs_closure(type(inner)) else Counted)(inner)
    epochs = -(-updates * batch_size // len(x))
    plain_train(net, opt, x, y, batch_size, epochs, seed=0, max_updates=updates)  # warm-up
    opt.evaluations = 0
    tic = time.perf_counter()
    plain_train(net, opt, x, y, batch_size, epochs, seed=1, max_updates=updates)
    return (time.perf_counter() - tic) / updates, opt.evaluations / updates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--updates", type=int, default=100, help="timed updates per (optimizer, round) at batch 128")
    ap.add_argument("--full-steps", type=int, default=5, help="timed updates per (optimizer, round) at full batch")
    ap.add_argument("--data", default=str(ROOT / "data"))
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    ensure_data(args.data)
    x, y = load_split(args.data, train=True)
    x, y = x[:50000].contiguous(), y[:50000]
    jobs = [(name, 128, args.updates) for name in MINI] + [(name, len(x), args.full_steps) for name in FULL]
    seconds = {job[:2]: [] for job in jobs}
    evaluations = {}
    for r in range(args.rounds):
        for name, bs, n in jobs if r % 2 == 0 else jobs[::-1]:
            s, e = time_updates(name, x, y, bs, n)
            seconds[name, bs].append(s)
            evaluations[name, bs] = e
            print(f"round {r}: {name} batch {bs}: {s * 1e3:.2f} ms/update, {e:.2f} evaluations/update", file=sys.stderr)
    print(f"| optimizer | batch | ms per update (median of {args.rounds}) | vs sgd | evaluations per update |")
    print("|---|---|---|---|---|")
    for name, bs, _ in jobs:
        median = statistics.median(seconds[name, bs])
        ratio = median / statistics.median(seconds["sgd", bs])
        print(f"| {name} | {bs} | {median * 1e3:.2f} | {ratio:.2f}x | {evaluations[name, bs]:.2f} |")


if __name__ == "__main__":
    main()

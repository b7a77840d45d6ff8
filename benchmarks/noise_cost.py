"""The gradient noise scale's cost against the seed run, interleaved in one process so that other load hits both
alike: an epoch of the seed run's updates (descent.engine.reference.plain_train, RMSprop, batch 128, 60000 examples),
then one noise probe (descent.measure.noise, 1024 examples), 3 times; the median ratio of the last 2.

    python benchmarks/noise_cost.py          # one intra-op thread (a shared machine; README, "Threads")

make bench's seed `descent` row measures the same inside src/train.py's own build, when the machine is quiet enough.
"""

import statistics
import time
from pathlib import Path

import torch

from descent.data import load_split
from descent.measure.noise import per_example_grads
from descent.nets import MLP
from descent.engine.reference import plain_train

torch.set_flush_denormal(True)
torch.set_num_threads(1)
x, y = load_split(Path(__file__).resolve().parents[1] / "data", train=True)
torch.manual_seed(0)
net = MLP()
opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1024]
ratios = []
for epoch in range(3):
    tic = time.perf_counter()
    plain_train(net, opt, x, y, 128, 1, seed=epoch)
    e = time.perf_counter() - tic
    tic = time.perf_counter()
    per_example_grads(net, x[idx], y[idx])
    p = time.perf_counter() - tic
    print(f"epoch {e:.3f} s, probe {p:.4f} s, {100 * p / e:.2f} %", flush=True)
    if epoch:
        ratios.append(p / e)
print(f"median {100 * statistics.median(ratios):.2f} % of an epoch per probe (threads {torch.get_num_threads()})")

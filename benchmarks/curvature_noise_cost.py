"""What B_noise and the preconditioned noise scale cost at one target crossing, against an epoch of training on
the same examples, in one process so that other load hits both alike: an epoch of RMSprop updates at batch 128
(descent.reference.plain_train) on the first N MNIST training examples, then B_simple, B_noise (H on 4096 of them,
32 groups) and B_precond (RMSprop's preconditioner) over those N, as the measurements at the targets take them.

    python benchmarks/curvature_noise_cost.py                        # the book's MLP, N = 10000
    python benchmarks/curvature_noise_cost.py --hidden 512 512       # 784-512-512-10
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from descent.data import load_split
from descent.measure import curvature_noise as cn
from descent.measure.noise import measure_with_error
from descent.nets import MLP
from descent.reference import plain_train

parser = argparse.ArgumentParser()
parser.add_argument("--examples", type=int, default=10000)
parser.add_argument("--hidden", type=int, nargs="+", default=[512])
parser.add_argument("--subset", type=int, default=4096, help="trainer.noise_hessian_subset")
args = parser.parse_args()
torch.set_flush_denormal(True)
x, y = load_split(Path(__file__).resolve().parents[1] / "data", train=True)
x, y = x[: args.examples], y[: args.examples]
torch.manual_seed(0)
net = MLP(hidden=args.hidden, in_features=784, classes=10)
opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)


def timed(f):
    tic = time.perf_counter()
    f()
    return time.perf_counter() - tic


for epoch in range(2):  # the first epoch warms the allocator and the caches; the second is reported
    train = timed(lambda: plain_train(net, opt, x, y, 128, 1, seed=epoch))
    simple = timed(lambda: measure_with_error(net, x, y, 32))
    noise = timed(lambda: cn.b_noise_with_error(net, F.cross_entropy, x, y, args.subset, 32))
    precond = timed(lambda: cn.b_precond_with_error(net, F.cross_entropy, x, y, cn.diagonal_preconditioner(opt), 32))
print(
    f"MLP 784-{'-'.join(map(str, args.hidden))}-10, {args.examples} examples, {torch.get_num_threads()} threads: "
    f"an epoch at batch 128 {train:.2f} s; per crossing B_simple {simple:.2f} s ({simple / train:.2g} epochs), "
    f"B_noise {noise:.2f} s ({noise / train:.2g}), B_precond {precond:.2f} s ({precond / train:.2g})"
)

"""The plain PyTorch loop (pytorch/examples' mnist style): the yardstick for descent's fast path.

Same data order (epoch_permutation), one update per batch_size examples, the mean loss of each batch.
The guard test checks that descent performs exactly these updates; the benchmark times both.
"""

from __future__ import annotations

import torch.nn.functional as F

from descent.data import epoch_permutation
from descent.nets.optim import needs_closure


def plain_train(net, optimizer, x, y, batch_size: int, epochs: int, seed: int, max_updates: int | None = None):
    updates, closure = 0, needs_closure(type(optimizer))
    for epoch in range(epochs):
        perm = epoch_permutation(len(x), seed, epoch, x.device)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if closure:  # L-BFGS evaluates the batch as often as its line search needs

                def batch_loss():
                    optimizer.zero_grad()
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    loss.backward()
                    return loss

                optimizer.step(batch_loss)
            else:
                loss = F.cross_entropy(net(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            updates += 1
            if max_updates is not None and updates >= max_updates:
                return updates
    return updates

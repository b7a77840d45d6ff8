"""How the loop trains on a piece of a chunk: the update steps behind one interface, and the cut into pieces.

The loop (descent/engine/loop.py, Classifier.training_step) cuts each chunk lightning hands over at update
boundaries (`segments`) and hands every piece to its step, which trains on it:

    start_epoch(perm, window, pending) -> window   the epoch's order (for a step that gathers batches by
                                                   epoch position; None for one that does not) and the metric
                                                   window it adds to (it may hand back its own)
    segment(x, y, a, b, batch_len, ends_batch, offset) -> evaluations
                                                   train on x[a:b], y[a:b] (epoch positions offset+a..offset+b),
                                                   a piece of a batch of batch_len examples; at the batch's last
                                                   piece (ends_batch) the optimizer steps; returns how often
                                                   the batch's loss and gradient were evaluated (0 mid-batch)

Three steps, picked by `choose`:
  EagerStep    forward, loss, backward, step: the plain loop (a batch larger than a chunk accumulates its mean
               gradient over its pieces)
  ClosureStep  an optimizer whose step takes a closure (L-BFGS) evaluates the whole batch itself, as often as
               it needs, at the batch's last piece
  GraphStep    (descent/engine/graphs.py) one CUDA-graph replay per update, gathering the batch by epoch position
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from descent.engine import graphs
from descent.nets.optim import needs_closure

log = logging.getLogger(__name__)


def segments(offset: int, length: int, n: int, batch_size: int):
    """Split examples [offset, offset+length) of an n-example epoch at update boundaries.

    Yields (start, stop, batch_len, ends_batch) relative to the chunk: each segment lies inside one
    batch; batch_len is that batch's size (the last batch of an epoch may be partial) and
    ends_batch says whether the optimizer steps after it.
    """
    if not (0 <= offset <= offset + length <= n) or batch_size < 1:
        raise ValueError(
            f"examples [{offset}, {offset + length}) in batches of {batch_size} do not lie "
            f"inside an epoch of {n} examples"
        )
    pos, end = offset, offset + length
    while pos < end:  # each turn moves pos forward: pos < end <= n, so batch_stop > pos
        batch_start = pos - pos % batch_size
        batch_stop = min(batch_start + batch_size, n)
        stop = min(batch_stop, end)
        yield pos - offset, stop - offset, batch_stop - batch_start, stop == batch_stop
        pos = stop


class Window:
    """Training loss and accuracy since the last log point, reduced only when it is logged."""

    def __init__(self, loss_sum: float = 0.0, correct: int = 0, n: int = 0):
        self.losses, self.weights, self.preds, self.targets = [], [], [], []
        self.carried = (loss_sum, correct)  # from a checkpoint written inside this window
        self.n = n

    def add(self, loss, weight, logits, targets) -> None:
        self.losses.append(loss)
        self.weights.append(weight)
        if logits.dim() == 2:  # class scores; a toy loss (descent/nets/toy.py) gives one loss per example, no accuracy
            self.preds.append(logits.detach().argmax(1))
            self.targets.append(targets)
        self.n += len(targets)

    def state(self) -> dict:
        """Sums so far: a checkpoint written inside a window carries them, so no example is lost."""
        loss_sum, correct = self.carried
        if self.losses:
            losses = torch.stack(self.losses)
            weights = torch.tensor(self.weights, dtype=losses.dtype, device=losses.device)
            loss_sum += float(losses @ weights)
            if self.preds:
                correct += int((torch.cat(self.preds) == torch.cat(self.targets)).sum())
        return {"loss_sum": loss_sum, "correct": correct, "n": self.n}

    def pop(self) -> tuple[float, float]:
        state = self.state()
        self.__init__()
        return state["loss_sum"] / state["n"], state["correct"] / state["n"]


class EagerStep:
    """The plain loop on the chunk's own examples: two small ops of bookkeeping per update (loss.detach, argmax)."""

    by_position = False  # reads the chunk, not the epoch's order

    def __init__(self, net, optimizer, criterion, opt_step=None):
        self.net, self.opt, self.criterion = net, optimizer, criterion
        self.opt_step = opt_step or optimizer.step  # trainer.compile_optimizer: a compiled one
        self.window: Window | None = None

    def start_epoch(self, perm, window, pending: int = 0):
        self.window = window
        return window

    def segment(self, x, y, a: int, b: int, batch_len: int, ends_batch: bool, offset: int) -> int:
        xb, yb = x[a:b], y[a:b]
        logits = self.net(xb)
        if b - a == batch_len:  # the whole batch in one piece: the common case
            loss = self.criterion(logits, yb)
            loss.backward()
            self.window.add(loss.detach(), batch_len, logits, yb)
        else:  # a piece of a batch larger than a chunk: accumulate the batch's mean gradient
            loss = self.criterion(logits, yb, reduction="sum")
            (loss / batch_len).backward()
            self.window.add(loss.detach(), 1, logits, yb)
        if not ends_batch:
            return 0
        self.opt_step()
        self.opt.zero_grad(set_to_none=True)
        return 1


class ClosureStep:
    """A closure-based optimizer (L-BFGS): its step evaluates the batch's loss and gradient itself, as often as
    its line search needs, so nothing is computed per piece. A batch that lies in the chunk is read from it; one
    spanning several chunks (a full batch) is gathered at its last piece from the training set by epoch position,
    as the graph path does: no gradient is half-accumulated between chunks, and a checkpoint there resumes by
    evaluating the batch whole."""

    by_position = True  # a batch spanning chunks is gathered through the epoch's order

    def __init__(self, net, optimizer, criterion, x_train, y_train):
        self.net, self.opt, self.criterion, self.x, self.y = net, optimizer, criterion, x_train, y_train
        self.window: Window | None = None
        self.perm: torch.Tensor | None = None

    def start_epoch(self, perm, window, pending: int = 0):
        self.perm, self.window = perm, window
        return window

    def segment(self, x, y, a: int, b: int, batch_len: int, ends_batch: bool, offset: int) -> int:
        if not ends_batch:
            return 0
        if b - a == batch_len:
            pieces = [(x[a:b], y[a:b])]
        else:
            index = self.perm[offset + b - batch_len : offset + b].split(len(x))  # chunk-sized pieces
            pieces = [(self.x[i], self.y[i]) for i in index]
        evaluations = [0]
        self.opt.step(self._closure(pieces, batch_len, evaluations))
        self.opt.zero_grad(set_to_none=True)  # as the eager loop: a checkpoint here holds no gradient
        return evaluations[0]

    def _closure(self, pieces: list, batch_len: int, evaluations: list):
        """The batch's mean loss with its gradient in .grad; the first evaluation (at the weights before
        the step, as every other optimizer's train/loss) goes into the metric window."""

        def closure():
            self.opt.zero_grad(set_to_none=True)
            total = 0.0
            for xb, yb in pieces:
                logits = self.net(xb)
                if len(pieces) == 1:  # the plain loop's mean, bit for bit
                    loss = self.criterion(logits, yb)
                else:
                    loss = self.criterion(logits, yb, reduction="sum") / batch_len
                loss.backward()
                total += loss.detach()
                if not evaluations[0]:  # the window sums loss * weight: this piece's sum
                    self.window.add(loss.detach(), batch_len, logits, yb)
            evaluations[0] += 1
            return total

        return closure


def choose(net, optimizer, criterion, x_train, y_train, cuda_graphs, device: torch.device, opt_step=None):
    """The step for this optimizer, loss and device: the graph path where trainer.cuda_graphs asks for it and it
    applies (cross-entropy, no closure), else the closure step for L-BFGS, else the eager step."""
    wanted = graphs.wanted(cuda_graphs, device)
    if needs_closure(type(optimizer)):
        if wanted:  # its step runs the closure a data-dependent number of times and reads the loss on the host
            # to decide (line search, tolerances): no fixed sequence of kernels for a graph to record
            log.info(
                "updates eagerly: %s's step calls a closure, which a CUDA graph cannot capture",
                type(optimizer).__name__,
            )
        return ClosureStep(net, optimizer, criterion, x_train, y_train)
    if wanted and criterion is F.cross_entropy:
        capture = device.type == "cuda"
        log.info(
            "updates through descent.engine.graphs.GraphStep (%s)",
            "one CUDA graph per batch size" if capture else f"uncaptured: {device.type}",
        )
        return graphs.GraphStep(net, optimizer, x_train, y_train, capture=capture)
    return EagerStep(net, optimizer, criterion, opt_step)

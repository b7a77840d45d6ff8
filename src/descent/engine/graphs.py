"""The GPU graph path: one CUDA-graph replay per update.

On a GPU an eager update of this small MLP is bound by kernel launches (some 20 per update at tens of µs
each), not by arithmetic: online SGD ran at ~0.9 ms/update on an H200, where a captured update replays in
~0.06 ms (both measured on an H200). So each update here is one replay of a graph that does all of it:
gather the batch from the training set held on the device through a static index buffer, forward,
cross-entropy, backward, optimizer step, and the loss/accuracy sums of the metric window, kept on the
device and read only at log points. Before each replay the host copies the batch's slice of the epoch's
permutation into the index buffer: two launches per update instead of ~20.

Nothing here depends on the network: the step calls net(x) on the gathered N x features rows, so the linear
model and the convnet (descent/nets/networks.py; its Unflatten is a view, its convolutions and pools are kernels
like the MLP's matmuls, warmed up on the side stream before capture, so cuDNN has chosen its algorithms)
take the same path. Captured, they are checked against the plain loop by tests/test_models.py's cuda test,
which runs where CUDA is; their replay speed is not measured yet.

The step is a plain method. Where there is no CUDA (trainer.cuda_graphs=true on CPU) it runs eagerly with
the same static buffers, warm-up and state reset, which is what the CPU tests prove equal to the plain loop.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

WARMUP = 3  # eager steps on a side stream before a capture: optimizer state, cuBLAS workspaces, autograd's streams


def wanted(setting, device: torch.device) -> bool:
    """trainer.cuda_graphs: auto = on with CUDA, off elsewhere; true = on (on CPU: uncaptured); false = off."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def optimizer_kwargs(make_optimizer, capture: bool) -> dict:
    """What the optimizer needs to be captured: capturable=True where the class has that flag.

    Adam and RMSprop keep their step count in `state["step"]`; capturable keeps it on the device and
    does the bias correction there, with no host sync (Adam refuses capture without it). SGD has no flag
    and needs none: it keeps no count. Learning rates stay floats: constant over a run (no scheduler),
    they are captured as kernel arguments; a tensor lr would only be needed to change it between replays.
    """
    cls = getattr(make_optimizer, "func", make_optimizer)  # hydra's _partial_ gives a functools.partial
    return {"capturable": True} if capture and "capturable" in inspect.signature(cls).parameters else {}


def match_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Loading a state dict replaces the param groups, capturable flag included: a checkpoint of a GPU
    graph run resumed on CPU would ask RMSprop for a device-side step there (it refuses), and a CPU
    checkpoint resumed in graph mode would make Adam refuse capture. This run's own setting wins."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable


class DeviceWindow:
    """The metric window of the graph path: sums on the device, added to inside the graph.

    Same interface as descent.engine.steps.Window (n, pop); reading costs one sync, at log points only.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.n = 0  # examples summed since the last pop, counted on the host: no sync to know it

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "n": self.n}

    def load(self, state: dict) -> None:
        self.loss_sum.fill_(state["loss_sum"])  # in place: the graphs hold these addresses
        self.correct.fill_(state["correct"])
        self.n = state["n"]

    def pop(self) -> tuple[float, float]:
        state = self.state()
        self.load({"loss_sum": 0.0, "correct": 0, "n": 0})
        return state["loss_sum"] / state["n"], state["correct"] / state["n"]


class GraphStep:
    """Updates by epoch position: update(a, b) trains on examples perm[a:b] of the current epoch.

    One static index buffer per batch size (the last batch of an epoch may be smaller), and on CUDA one
    captured graph per size, captured on first use: after lightning has restored a checkpoint's
    optimizer state, which the graph must address. A step of the loop (descent/engine/steps.py): `segment`.
    """

    by_position = True  # the chunk's examples are not read: each update gathers its batch by epoch position

    def __init__(self, net, optimizer, x: torch.Tensor, y: torch.Tensor, capture: bool):
        if capture and x.device.type != "cuda":
            raise ValueError(f"capturing needs the data on a CUDA device, not {x.device}")
        for group in optimizer.param_groups:  # see _warm_up: lazily created state is reset to zeros
            if group.get("momentum", 0) and group.get("dampening", 0):
                raise ValueError("the graph path needs dampening = 0 with momentum (its first step differs)")
        self.net, self.opt, self.x, self.y, self.capture = net, optimizer, x, y, capture
        self.window = DeviceWindow(x.device)
        self.index: dict[int, torch.Tensor] = {}  # batch size -> static index buffer
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.perm: torch.Tensor | None = None

    def start_epoch(self, perm: torch.Tensor, window, pending: int = 0) -> DeviceWindow:
        """Train on this order from now on, and take over the metric window's sums (a resumed run's).

        pending: examples of the current batch before the resume point. The graph path recomputes that
        batch whole (it needs no half-accumulated gradient), so when the carried window holds just those
        examples it is dropped rather than counted twice. (When it also holds earlier batches, which
        needs log_every > batch_size > chunk_size, they are kept and those examples count twice.)
        """
        self.perm = perm.to(self.x.device)
        if window is not self.window and window.n:
            carried = window.state()
            self.window.load(carried if carried["n"] != pending else {"loss_sum": 0.0, "correct": 0, "n": 0})
        return self.window

    def step(self, index: torch.Tensor) -> None:
        """One update on examples x[index], as the graph records it: no host sync anywhere in it."""
        x, y = self.x.index_select(0, index), self.y.index_select(0, index)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.window.loss_sum.add_(loss.detach() * len(index))
            self.window.correct.add_((logits.argmax(1) == y).sum())

    def segment(self, x, y, a: int, b: int, batch_len: int, ends_batch: bool, offset: int) -> int:
        """The loop's segments, but the chunk is not read: a batch is one update at its last piece (a full batch
        spanning several chunks too), on the examples of its epoch positions, already on the device."""
        if not ends_batch:
            return 0
        self.update(offset + b - batch_len, offset + b)
        return 1

    def update(self, a: int, b: int) -> None:
        size = b - a
        if size not in self.index:
            self._prepare(size)
        self.index[size].copy_(self.perm[a:b])
        if self.capture:
            self.graphs[size].replay()
        else:
            self.step(self.index[size])
            self.opt.zero_grad(set_to_none=True)  # as the eager loop; a graph's backward writes its grads afresh
        self.window.n += size

    # -- capture ------------------------------------------------------------------------------

    def _prepare(self, size: int) -> None:
        index = torch.arange(size, device=self.x.device)  # any valid examples: warm-up effects are undone
        self.index[size] = index
        # grads from a resumed eager checkpoint (half a batch) are dropped: this path recomputes the batch
        # whole; and a capture with grads present would record accumulation into them at every replay
        self.opt.zero_grad(set_to_none=True)
        before = self._snapshot()
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._warm_up(index)
            torch.cuda.current_stream().wait_stream(side)
            # grads are None here, so the captured backward allocates them in the graph's pool and
            # overwrites them at each replay (no zero_grad inside the graph)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(index)
            self.graphs[size] = graph
            # the grads stay in the graph's own memory pool and are rewritten by each replay; let go of the
            # python references so that a checkpoint sees no half-accumulated gradient (as between eager updates)
            self.opt.zero_grad(set_to_none=True)
        else:  # nothing to capture; warming up anyway runs the same reset, so the CPU tests prove it exact
            self._warm_up(index)
        self._restore(before)

    def _warm_up(self, index: torch.Tensor) -> None:
        with warnings.catch_warnings():  # "capturable=True ... running without graph capture": on purpose here
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for _ in range(WARMUP):
                self.step(index)
                self.opt.zero_grad(set_to_none=True)

    def _state(self):
        """Every tensor a step writes that outlives it: parameters, optimizer state, the window's sums."""
        yield from self.net.parameters()
        for state in self.opt.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))
        yield from (self.window.loss_sum, self.window.correct)

    def _snapshot(self) -> dict[int, torch.Tensor]:
        return {id(t): t.detach().clone() for t in self._state()}

    @torch.no_grad()
    def _restore(self, before: dict[int, torch.Tensor]) -> None:
        """Undo the warm-up in place (the graph holds these addresses): values from before it, and zeros
        for optimizer state it created. Zeros are what Adam and RMSprop initialise to; SGD starts its
        momentum buffer at the first gradient, which momentum * 0 + grad equals when dampening is 0."""
        for t in self._state():
            if id(t) in before:
                t.copy_(before[id(t)])
            else:
                t.zero_()

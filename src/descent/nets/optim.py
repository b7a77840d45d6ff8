"""Muon on the hidden weight matrices, AdamW on every other parameter: one optimizer to the loop.

torch.optim.Muon orthogonalizes each update by Newton-Schulz iterations, which only mean something for
a 2-D weight matrix (it refuses anything else); Jordan et al. give the biases and the output layer to
AdamW. torch ships the two optimizers, not the split: this class holds one of each, on the parameters
its name patterns pick, and is a torch Optimizer to everything that handles one (the loop, lightning's
checkpoints, the graph path): param_groups and state are the two optimizers' own, seen together.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch


def split(named, groups: dict[str, list[str]], matrices_only: tuple[str, ...] = ()) -> dict[str, list]:
    """(name, parameter) pairs into the groups whose fnmatch patterns name them: every parameter in
    exactly one group, every pattern naming something, the groups in matrices_only holding 2-D tensors
    only. Raises ValueError listing every problem at once (descent/config/ shows them before anything runs)."""
    named = list(named)
    found = {group: [] for group in groups}
    problems = []
    keys = ", ".join(f"{g}_params" for g in groups)
    for name, p in named:
        owners = [g for g, patterns in groups.items() if any(fnmatchcase(name, pat) for pat in patterns)]
        if len(owners) != 1:
            named_by = " and ".join(f"{g}_params" for g in owners) or "none of them"
            problems.append(
                f"{keys}: parameter {name} (shape {list(p.shape)}) is named by {named_by}; "
                "each parameter must be named by exactly one"
            )
            continue
        if owners[0] in matrices_only and p.ndim != 2:
            problems.append(
                f"{owners[0]}_params={list(groups[owners[0]])!r} names {name} (shape {list(p.shape)}): "
                f"{owners[0]} takes 2-D weight matrices only; name it in another group"
            )
        found[owners[0]].append((name, p))
    for group, patterns in groups.items():
        for pat in patterns:
            if not any(fnmatchcase(name, pat) for name, _ in named):
                problems.append(
                    f"{group}_params={list(patterns)!r}: {pat!r} names no parameter of the model "
                    f"(its parameters: {', '.join(name for name, _ in named)})"
                )
    if problems:
        raise ValueError("\n".join(problems))
    return found


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the parameters muon_params names, torch.optim.AdamW (with the `adamw`
    hyperparameters) on those adamw_params names. Patterns are fnmatch patterns on the network's
    parameter names (`0.weight`, `*.bias`); the module hands over named parameters."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        muon_params: list[str] = ("0.weight",),
        adamw_params: list[str] = ("2.weight", "*.bias"),
        adamw: dict | None = None,
        capturable: bool = False,
    ):
        named = list(params)
        if named and not isinstance(named[0], tuple):
            raise TypeError("MuonAdamW picks parameters by name: pass net.named_parameters()")
        groups = split(named, {"muon": list(muon_params), "adamw": list(adamw_params)}, matrices_only=("muon",))
        self.muon = torch.optim.Muon(
            groups["muon"],
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
        )
        # Muon keeps no step count and has no capturable flag; AdamW's count goes on the device for a CUDA graph
        self.adamw = torch.optim.AdamW(groups["adamw"], **dict(adamw or {}), capturable=capturable)
        self.defaults = (
            self.muon.defaults
        )  # no Optimizer.__init__: the two optimizers own the parameters, groups, state
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups  # the groups themselves: edits reach them

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}  # the per-parameter dicts themselves

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])

    def __repr__(self) -> str:
        return f"MuonAdamW(\n{self.muon!r},\n{self.adamw!r})"


def needs_closure(optimizer_class) -> bool:
    """Whether step() must be given a closure (L-BFGS: it evaluates the loss several times a step)."""
    import inspect

    closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty

"""A toy loss's trace (descent/nets/toy.py): where the point is at each validation point, and how far it moved."""

from __future__ import annotations

import torch

from descent.tracking import names


class Trace:
    """The point's coordinates (toy/w, or toy/x and toy/y) and toy/step, the length of the step since the previous
    validation point (the last update's when validation runs at every update, as in the presets)."""

    def __init__(self, net):
        self.coords, self.last = net.surface.coords, torch.tensor(net.start, dtype=torch.float64)

    # a resumed run's first step is measured from where the checkpoint left the point (the loop's checkpoint
    # carries each measurement's state_dict)
    def state_dict(self) -> dict:
        return {"last": self.last.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.last = torch.tensor(state["last"], dtype=torch.float64)

    def __call__(self, point) -> dict[str, float]:
        w = point.net.w.detach().double().cpu()
        found = {names.toy_key(c): float(v) for c, v in zip(self.coords, w)}
        found[names.TOY_STEP] = float((w - self.last).norm())
        self.last = w
        return found

"""When a run validates: every val_every_examples examples, the gap growing with the run to val_every_share of the
examples seen (a crossing of a target is then resolved to that share of its count, at fewer checks than a fixed
gap that resolves the earliest crossing). One deterministic sequence of points: a resumed run recomputes it."""

from __future__ import annotations

import math


def gap(examples: float, every: int, share: float | None) -> int:
    """The examples from the validation point at `examples` to the next one."""
    return max(every, int(share * examples)) if share else every


def next_point(examples: int, every: int | None, share: float | None = None) -> float:
    """The first validation point after `examples` (math.inf when the run validates at epoch ends only)."""
    if not every:
        return math.inf
    if not share:
        return (examples // every + 1) * every
    point = every
    while point <= examples:
        point += gap(point, every, share)
    return point

"""nets/: the networks (sized from the data), the optimizers descent defines, the toy losses of the chapter's pictures."""

from __future__ import annotations

import importlib
from pathlib import Path


def __getattr__(name: str):
    # conf/model's `_target_: descent.nets.MLP` (the public name) resolves here, importing the networks
    # (torch) only when one is named
    if name.startswith("__"):
        raise AttributeError(name)
    if (Path(__file__).parent / f"{name}.py").exists():
        return importlib.import_module(f"{__name__}.{name}")
    try:
        return getattr(importlib.import_module(f"{__name__}.networks"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

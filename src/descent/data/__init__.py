"""data/: what runs train on, held in memory: the table of dataset facts, the data modules, reading and checking files."""

from __future__ import annotations

import importlib
from pathlib import Path


def __getattr__(name: str):
    # conf/data's `_target_: descent.data.IDXDataModule` (the public name) resolves here, importing the data modules
    # (torch, lightning) only when one is named: descent.data.datasets stays a light import for config and reports
    if name.startswith("__"):
        raise AttributeError(name)
    if (Path(__file__).parent / f"{name}.py").exists():
        return importlib.import_module(f"{__name__}.{name}")
    try:
        return getattr(importlib.import_module(f"{__name__}.modules"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

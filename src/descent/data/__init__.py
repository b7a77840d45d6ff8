"""data/: what runs train on, held in memory: the table of dataset facts, the data modules, reading and checking files."""

from __future__ import annotations

import importlib
from pathlib import Path

# where conf/data's public names (`_target_: descent.data.IDXDataModule`) and the data's helpers are defined
MODULES = ("memory", "idx", "files", "toy")


def __getattr__(name: str):
    # descent.data.X resolves here, importing the data modules (torch, lightning) only when one is named:
    # descent.data.datasets stays a light import for config and reports
    if name.startswith("__"):
        raise AttributeError(name)
    if (Path(__file__).parent / f"{name}.py").exists():
        return importlib.import_module(f"{__name__}.{name}")
    for module in MODULES:
        found = importlib.import_module(f"{__name__}.{module}")
        if name in vars(found):
            return vars(found)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

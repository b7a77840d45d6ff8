"""config/: the config checked before anything is built: rules, schema from conf/, checks, sweeps, resume, resolvers."""

from __future__ import annotations

import importlib

# the public names, each imported from its module when first named: `from descent.config import ConfigError`
# (tracking/store.py, on src/compare.py's path) then loads no hydra, whose package the other modules import
# (measured: omegaconf 0.07 s, omegaconf and hydra 0.14 s to import, best of 5 on a quiet core)
PUBLIC = {
    "ConfigError": "rules",
    "exit_2_if_refused": "rules",
    "validate": "checks",
    "lr_not_searched": "checks",
    "LR_TAG": "checks",
    "OBJECTIVES": "schema",
    "validate_sweep": "sweeps",
    "resume_config": "resume",
    "resume_run": "resume",
    "RESUME_MAY_CHANGE": "resume",
    "register": "resolvers",
}


def __getattr__(name: str):
    if name in PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

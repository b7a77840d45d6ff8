"""The rule engine: a rule is (a test of a resolved value, what is allowed in words); ConfigError lists problems."""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager


class ConfigError(ValueError):
    """The config asks for something we refuse; one problem per line."""


@contextmanager
def exit_2_if_refused():
    """A ConfigError raised inside ends the process before anything runs: its problems logged (on the entry
    point's logger), exit status 2. With HYDRA_FULL_ERROR=1 it is raised instead, with its traceback."""
    try:
        yield
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("descent").error("invalid config, nothing was run:\n%s", e)
        sys.exit(2)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, why: str = ""):
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return (lambda v: is_int(v) and lo <= v and (hi is None or v <= hi)), words + (f" ({why})" if why else "")


def nullable(rule, meaning: str):
    test, words = rule
    return (lambda v: v is None or test(v)), f"null ({meaning}) or {words}"


BOOLEAN = (lambda v: isinstance(v, bool), "true or false")
BOOLEAN_OR_AUTO = (lambda v: v is None or isinstance(v, bool), "null (torch chooses), true or false")
STRING = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
NUMBER = (is_number, "a finite number")
POSITIVE = (lambda v: is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: is_number(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
ANY = (lambda v: True, "anything")  # checked elsewhere, together with other keys
PATTERNS = (
    lambda v: isinstance(v, list) and all(isinstance(p, str) and p for p in v),
    'a list of fnmatch patterns of parameter names (e.g. ["0.weight", "*.bias"])',
)
LR_TABLE = (
    lambda v: isinstance(v, dict) and all(POSITIVE[0](lr) for lr in v.values()),
    "a mapping of option names to learning rates > 0",
)


def by_default(default):
    """The rule of a key that has none of its own: the type of its default (a class's or conf/'s)."""
    return BOOLEAN if isinstance(default, bool) else NUMBER if is_number(default) else None


def show(v) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return repr(v)


def why(e: Exception) -> str:
    return str(e).splitlines()[0]

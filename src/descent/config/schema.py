"""The schema: the keys a config may have (conf/'s, the _target_s' signatures), rules for the values that need them."""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from descent.config.rules import (
    ANY,
    BOOLEAN,
    BOOLEAN_OR_AUTO,
    FRACTION,
    LR_TABLE,
    NON_NEGATIVE,
    PATTERNS,
    POSITIVE,
    STRING,
    by_default,
    integer,
    is_int,
    is_number,
    nullable,
    show,
    why,
)
from descent.tracking import names

CONF = Path(__file__).resolve().parents[3] / "conf"  # the project's own, when no Hydra job says where it composed from
TARGET_PREFIXES = ("torch.optim.", "torch.nn.", "descent.")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it

# what train.py may return, and the direction a search takes on it (never the test set: a search tuned on
# it would report the test set's best, not the model's)
OBJECTIVES = {
    names.VAL_LOSS: "minimize",
    names.VAL_ACC: "maximize",
    # the updates (examples) a run took to reach val/acc >= sweep.target_acc; it stops there, and a run
    # that misses it within its budget (trainer.max_epochs, max_updates) returns nothing: a FAIL
    names.TARGET_UPDATES: "minimize",
    names.TARGET_EXAMPLES: "minimize",
}

# The keys of conf/train.yaml and the top-level keys of the _global_ presets (conf/experiment/) are the keys a
# config may have; a key is added there, with its comment. The rules below are for the values that need more
# than the type of their default (a key without a rule must keep that type: true/false or a number).
TOP = {
    "seed": integer(0, 2**32 - 1),  # lightning's seed_everything refuses the rest
    "resume": nullable(STRING, "a new run"),
    "lr_by_batching": LR_TABLE,  # experiment presets: a learning rate per option, picked by interpolation
    "lr_by_optimizer": LR_TABLE,
    "lr_searched": (
        lambda v: isinstance(v, dict) and all(LR_TABLE[0](t) for t in v.values()),  # per <data>-<model>
        "a mapping of <data>-<model> (mnist-mlp, ...) to mappings of option names to learning rates > 0",
    ),
    "lr_ratio": POSITIVE,  # experiment=step_size: the learning rate as a multiple of 2/L
    "start_by_model": (lambda v: isinstance(v, dict), "a mapping of model options to starting points"),
    # experiment=local_minima: one arm (its momentum and learning rate) and one noise draw (std and seed)
    "arm": (
        lambda v: (
            isinstance(v, dict) and set(v) == {"momentum", "lr"} and FRACTION[0](v["momentum"]) and POSITIVE[0](v["lr"])
        ),
        "a mapping {momentum: a number in [0, 1), lr: a number > 0}",
    ),
    "draw": (
        lambda v: (
            isinstance(v, dict)
            and set(v) == {"noise", "seed"}
            and NON_NEGATIVE[0](v["noise"])
            and is_int(v["seed"])
            and v["seed"] >= 0
        ),
        "a mapping {noise: a number >= 0, seed: an integer >= 0}",
    ),
}
SECTION_RULES = {
    "trainer": {
        "max_epochs": integer(1),
        "accelerator": STRING,
        "log_every_examples": integer(1),
        "val_every_examples": nullable(integer(1), "at epoch ends only"),
        "val_every_share": nullable(
            (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
            "a fixed gap",
        ),
        "cuda_graphs": (lambda v: v is True or v is False or v == "auto", "auto, true or false"),
        "checkpoint_every_seconds": POSITIVE,
        "threads": nullable(integer(1), "chosen from the batch size and the CPUs granted: descent/engine/threads.py"),
        "sharpness_every": nullable(integer(1), "not measured"),
        "sharpness_subset": integer(1, why="training examples the Hessian is taken on"),
        "max_updates": nullable(integer(1), "max_epochs alone"),
        "noise_probe": integer(2),
        "noise_hessian_subset": integer(2, why="training examples the Hessian of B_noise is taken on"),
        "measures": (
            lambda v: isinstance(v, dict) and all(isinstance(m, dict) and "_target_" in m for m in v.values()),
            "a mapping of names to {_target_: descent.measure.<module>.<Class>, its arguments}",
        ),
    },
    "sweep": {
        "objective": (lambda v: v in OBJECTIVES, "one of " + ", ".join(OBJECTIVES)),
        "target_acc": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "targets": (
            lambda v: isinstance(v, list) and all(is_number(t) and 0 < t <= 1 for t in v),
            "a list of numbers in (0, 1] (val accuracies whose first crossing is logged; [] = none)",
        ),
    },
    "logger": {
        "experiment_name": STRING,
        "tracking_uri": STRING,
        "outage_seconds": POSITIVE,
        "register_model": nullable(STRING, "not registered"),
    },
}

# data, model and optimizer accept the parameters of their _target_'s __init__; these are the ones
# with limits; the others must match the type of their default.
TARGET_RULES = {
    "data": {
        "name": STRING,  # checked against the _target_'s sets (checks.data_name)
        "root": STRING,
        "download": BOOLEAN,
        "chunk_size": integer(1),
        "path": STRING,
        "drop_last": BOOLEAN,
        "val_size": ANY,
        "limit_train": ANY,
        "batch_size": ANY,  # see checks.data_sizes
        "noise": NON_NEGATIVE,
        "n_train": integer(1),
    },  # a toy loss's gradient oracle (descent/nets/toy.py)
    # the networks' ends are sized from the data (descent/nets/networks.py's build); a size given must be the data's
    "model": {
        "in_features": nullable(integer(1), "taken from the data"),
        "side": nullable(integer(1), "taken from the data"),
        "classes": nullable(integer(2), "taken from the data"),
        "hidden": (
            lambda v: is_int(v) and v >= 1 or isinstance(v, list) and all(is_int(h) and h >= 1 for h in v),
            "a list of integers >= 1, the hidden layers' widths ([] = none: softmax regression)",
        ),
        "filters": (
            lambda v: isinstance(v, list) and len(v) >= 1 and all(is_int(f) and f >= 1 for f in v),
            "a non-empty list of integers >= 1, the convolutions' channels (as many as the data's images "
            "leave pixels for after the pools: descent/nets/networks.py)",
        ),
        "init": (lambda v: v in ("keras", "torch"), "one of keras, torch"),
        "loss": ANY,
        "start": ANY,
    },  # a toy loss (descent/nets/toy.py) or the MLP's: see checks.toy
    "optimizer": {
        "_partial_": (lambda v: v is True, "true (the module calls it on the model's parameters)"),
        "lr": POSITIVE,
        "momentum": FRACTION,
        "dampening": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "betas": (
            lambda v: isinstance(v, list) and len(v) == 2 and all(map(FRACTION[0], v)),
            "a pair of numbers, each in [0, 1)",
        ),
        "eps": POSITIVE,
        "alpha": FRACTION,  # RMSprop's decay of the mean squared gradient (keras' rho)
        "weight_decay": NON_NEGATIVE,
        "foreach": BOOLEAN_OR_AUTO,
        "fused": BOOLEAN_OR_AUTO,
        # torch.optim.LBFGS
        "max_iter": integer(1),
        "max_eval": nullable(integer(1), "max_iter * 5 / 4"),
        "history_size": integer(1),
        "tolerance_grad": NON_NEGATIVE,
        "tolerance_change": NON_NEGATIVE,
        "line_search_fn": (lambda v: v in (None, "strong_wolfe"), "null (a fixed step of lr) or strong_wolfe"),
        # descent.nets.optim.MuonAdamW (torch.optim.Muon's and AdamW's keys)
        "ns_steps": integer(1, 99),
        "adjust_lr_fn": (
            lambda v: v in (None, "original", "match_rms_adamw", "spectral_unclamped"),
            "null, original, match_rms_adamw or spectral_unclamped",
        ),
        "muon_params": PATTERNS,
        "adamw_params": PATTERNS,
        "adamw": (lambda v: isinstance(v, dict), "a mapping of torch.optim.AdamW's keys"),  # checked as a section
    },
}
SUPPLIED = {"data": {"seed"}, "model": {"shape"}, "optimizer": {"params"}}  # arguments train.py, the data and the
# module pass themselves


@dataclass(frozen=True)
class Schema:
    top: dict  # key -> rule (None: no check here; a section is checked as one)
    required: list  # the top-level keys conf/train.yaml gives
    sections: dict  # trainer, sweep, logger -> {key: rule or None}, every key of conf/train.yaml's section


def conf_dir() -> tuple[Path, str]:
    """The config folder and primary config the job was composed from (Hydra's main source), else conf/train."""
    hydra = HydraConfig.instance().cfg
    sources = OmegaConf.select(hydra, "hydra.runtime.config_sources", default=None) if hydra is not None else None
    for source in sources or ():
        if source.provider == "main" and source.schema == "file":
            return Path(source.path), str(OmegaConf.select(hydra, "hydra.job.config_name", default="train"))
    return CONF, "train"


def current() -> Schema:
    folder, name = conf_dir()
    primary = folder / f"{name}.yaml"
    return read(primary, primary.stat().st_mtime_ns if primary.exists() else 0)


@functools.lru_cache(maxsize=8)
def read(primary: Path, _mtime: int) -> Schema:
    """The keys of the primary config and the top-level keys of the presets that write at the top (_global_)."""
    # the primary config as Hydra reads it (values typed as OmegaConf types them: 1e-3 is a number; their type is
    # the rule of a key without one), ~20 ms of CPU; of the presets only their keys' names, read with libyaml
    # (~1 ms a file, where OmegaConf's pure-Python loader takes ~15 ms)
    base = OmegaConf.to_container(OmegaConf.load(primary)) if primary.exists() else {}
    base = {k: v for k, v in base.items() if k not in ("defaults", "hydra")}
    sections = {k: v for k, v in base.items() if isinstance(v, dict)}
    keys = {k: v for k, v in base.items() if k not in sections}
    presets = set()
    for file in primary.parent.glob("*/*.yaml"):
        text = file.read_text()
        if file.parent.name != "hydra" and text.startswith("# @package _global_"):
            presets |= set(yaml.load(text, Loader=LOADER) or {})
    presets -= {*base, *TARGET_RULES, "defaults", "hydra"}
    presets = [k for k in TOP if k in presets] + sorted(presets - set(TOP))  # as the rules list them, then by name
    top = {k: TOP.get(k) or by_default(v) for k, v in keys.items()} | {k: TOP.get(k) for k in presets}
    top |= dict.fromkeys([*sections, *TARGET_RULES])
    rules = {
        name: {k: SECTION_RULES.get(name, {}).get(k) or by_default(v) for k, v in keys_.items()}
        for name, keys_ in sections.items()
    }
    return Schema(top, list(keys), rules)


def refused_targets(cfg: DictConfig) -> list[str]:
    """Every _target_ outside the allowed packages, found without importing or resolving anything else."""
    problems = []

    def walk(node, path):
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            if key == "_target_":
                try:
                    target = node[key]
                except InterpolationResolutionError as e:
                    target = f"<cannot be resolved: {why(e)}>"
                if not (isinstance(target, str) and target.startswith(TARGET_PREFIXES)):
                    problems.append(
                        f"{path}_target_={show(target)}: refused; _target_ must be in torch.optim, torch.nn or descent"
                    )
            elif OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue  # a value we need not resolve here (containers are walked where they are defined)
            elif OmegaConf.is_config(child := node[key]):
                walk(child, f"{path}{key}.")

    walk(cfg, "")
    return problems


def check(node: DictConfig, prefix: str, rules: dict, required, where: str, problems: list) -> dict:
    """Unknown and missing keys, then each value (resolved) against its rule; returns the values checked."""
    values = {}
    for key in node:
        name = prefix + str(key)
        if key not in rules:
            allowed = ", ".join(k for k in rules if not k.startswith("_"))
            problems.append(f"{name}: unknown key; allowed keys{where}: {allowed}")
        elif rules.get(key) is not None and not OmegaConf.is_missing(node, key):
            try:
                value = node[key]
                value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except InterpolationResolutionError as e:
                problems.append(f"{name}: cannot be resolved: {why(e)}")
                continue
            values[key] = value
            test, words = rules[key]
            if not test(value):
                problems.append(f"{name}={show(value)}: must be {words}")
    for key in required:
        if key not in node or OmegaConf.is_missing(node, key):
            problems.append(f"{prefix}{key}: missing" + (f"; must be {rules[key][1]}" if rules.get(key) else ""))
    return values


def target_rules(name: str, node: DictConfig, problems: list) -> tuple[dict, list, str] | None:
    """The keys the section's _target_ accepts, with their rules; None when it has no usable target."""
    if "_target_" not in node:
        problems.append(f"{name}._target_: missing; must name a class in torch.optim, torch.nn or descent")
        return None
    target = OmegaConf.select(node, "_target_", throw_on_resolution_failure=False)
    if not (isinstance(target, str) and target.startswith(TARGET_PREFIXES)):
        return None  # refused by refused_targets, and never imported
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        problems.append(f"{name}._target_={show(target)}: cannot be imported ({why(e)})")
        return None
    if not inspect.isclass(cls):
        problems.append(f"{name}._target_={show(target)}: must name a class")
        return None
    return class_rules(name, cls, target)


def class_rules(name: str, cls, target: str) -> tuple[dict, list, str]:
    """The keys a class's __init__ accepts under section `name`, with their rules, and the required ones."""
    params = [
        p
        for p in inspect.signature(cls).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in SUPPLIED.get(name, ())
    ]
    rules = {
        "_target_": None,
        **({"_partial_": None} if name == "optimizer" else {}),
        **{p.name: by_default(p.default) for p in params},
    }
    rules |= {k: rule for k, rule in TARGET_RULES[name].items() if k in rules}
    required = [p.name for p in params if p.default is p.empty] + (["_partial_"] if name == "optimizer" else [])
    return rules, required, f" for {target}"


def target_class(node: DictConfig):
    """The class of a section whose _target_ validate() found importable (so this imports nothing new)."""
    module, _, attr = node._target_.rpartition(".")
    return getattr(importlib.import_module(module), attr)

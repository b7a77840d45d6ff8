"""Check the composed config before anything is built and before any MLflow run exists.

Every problem is reported at once, one per line, naming the key, the value given and what is allowed.
A `_target_` is imported only from torch.optim, torch.nn or descent, and only after that check.
"""

from __future__ import annotations

import importlib
import inspect
import math

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from descent.data import datasets

TARGET_PREFIXES = ("torch.optim.", "torch.nn.", "descent.")


class ConfigError(ValueError):
    """The config asks for something we refuse; one problem per line."""


# a rule is (test of the resolved value, what is allowed in words)

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, why: str = ""):
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return (lambda v: _is_int(v) and lo <= v and (hi is None or v <= hi)), words + (f" ({why})" if why else "")


def nullable(rule, meaning: str):
    test, words = rule
    return (lambda v: v is None or test(v)), f"null ({meaning}) or {words}"


BOOLEAN = (lambda v: isinstance(v, bool), "true or false")
BOOLEAN_OR_AUTO = (lambda v: v is None or isinstance(v, bool), "null (torch chooses), true or false")
STRING = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
NUMBER = (_is_number, "a finite number")
POSITIVE = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
ANY = (lambda v: True, "anything")  # checked elsewhere, together with other keys
PATTERNS = (lambda v: isinstance(v, list) and all(isinstance(p, str) and p for p in v),
            "a list of fnmatch patterns of parameter names (e.g. [\"0.weight\", \"*.bias\"])")
LR_TABLE = (lambda v: isinstance(v, dict) and all(POSITIVE[0](lr) for lr in v.values()),
            "a mapping of option names to learning rates > 0")

TOP = {
    "seed": integer(0, 2**32 - 1),  # lightning's seed_everything refuses the rest
    "resume": nullable(STRING, "a new run"),
    "lr_by_batching": LR_TABLE,     # experiment presets: a learning rate per option, picked by interpolation
    "lr_by_optimizer": LR_TABLE,
    "lr_searched": (lambda v: isinstance(v, dict) and all(LR_TABLE[0](t) for t in v.values()),  # per <data>-<model>
                    "a mapping of <data>-<model> (mnist-mlp, ...) to mappings of option names to learning rates > 0"),
    "lr_ratio": POSITIVE,           # experiment=step_size: the learning rate as a multiple of 2/L
    "start_by_model": (lambda v: isinstance(v, dict), "a mapping of model options to starting points"),
    # experiment=local_minima: one arm (its momentum and learning rate) and one noise draw (std and seed)
    "arm": (lambda v: isinstance(v, dict) and set(v) == {"momentum", "lr"} and FRACTION[0](v["momentum"])
            and POSITIVE[0](v["lr"]), "a mapping {momentum: a number in [0, 1), lr: a number > 0}"),
    "draw": (lambda v: isinstance(v, dict) and set(v) == {"noise", "seed"} and NON_NEGATIVE[0](v["noise"])
             and _is_int(v["seed"]) and v["seed"] >= 0, "a mapping {noise: a number >= 0, seed: an integer >= 0}"),
}
OPTIONAL = {"lr_by_batching", "lr_by_optimizer", "lr_searched", "lr_ratio", "start_by_model", "arm", "draw"}
SECTIONS = ("trainer", "logger", "data", "model", "optimizer", "sweep")

# what train.py may return, and the direction a search takes on it (never the test set: a search tuned on
# it would report the test set's best, not the model's)
OBJECTIVES = {"val/loss": "minimize", "val/acc": "maximize",
              # the updates (examples) a run took to reach val/acc >= sweep.target_acc; it stops there, and a run
              # that misses it within its budget (trainer.max_epochs, max_updates) returns nothing: a FAIL
              "target/updates": "minimize", "target/examples": "minimize"}
# conf/hydra/sweeper/optuna.yaml: direction: ${descent.direction:${sweep.objective}}
OmegaConf.register_new_resolver("descent.direction", lambda objective: OBJECTIVES.get(objective, "minimize"),
                                replace=True)


# conf/experiment/*.yaml: data.val_size: ${descent.held_out:...}, the validation examples a study holds out of
# the data's training set (descent/data/datasets.py: MNIST's last 10000)
OmegaConf.register_new_resolver("descent.held_out", datasets.held_out, replace=True)
# conf/experiment/edge_of_stability.yaml: data.limit_train: ${descent.at_most:5000,...}, at most the data's examples
OmegaConf.register_new_resolver("descent.at_most", datasets.at_most, replace=True)


def _times_two_over_l(ratio, loss):
    from descent.nets.toy import LOSSES

    return float(ratio) * 2 / LOSSES[loss].L


# conf/experiment/step_size.yaml: optimizer.lr: ${descent.times_2_over_L:${lr_ratio},${model.loss}}, a learning
# rate as a multiple of 2/L, L the toy loss's largest curvature at its global minimum
OmegaConf.register_new_resolver("descent.times_2_over_L", _times_two_over_l, replace=True)

TRAINER = {
    "max_epochs": integer(1),
    "accelerator": STRING,
    "log_every_examples": integer(1),
    "val_every_examples": nullable(integer(1), "at epoch ends only"),
    "progress_bar": BOOLEAN,
    "compile_optimizer": BOOLEAN,
    "flush_denormal": BOOLEAN,
    "cuda_graphs": (lambda v: v is True or v is False or v == "auto", "auto, true or false"),
    "checkpoint_every_seconds": POSITIVE,
    "threads": nullable(integer(1), "chosen from the batch size and the CPUs granted: descent/engine/threads.py"),
    "sharpness_every": nullable(integer(1), "not measured"),
    "sharpness_subset": integer(1, why="training examples the Hessian is taken on"),
    "max_updates": nullable(integer(1), "max_epochs alone"),
    "noise_scale": BOOLEAN,
    "noise_probe": integer(2),
    "noise_at_targets": BOOLEAN,
}
SWEEP = {"objective": (lambda v: v in OBJECTIVES, "one of " + ", ".join(OBJECTIVES)),
         "target_acc": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
         "targets": (lambda v: isinstance(v, list) and all(_is_number(t) and 0 < t <= 1 for t in v),
                     "a list of numbers in (0, 1] (val accuracies whose first crossing is logged; [] = none)")}
LOGGER = {"experiment_name": STRING, "tracking_uri": STRING, "log_checkpoint": BOOLEAN, "outage_seconds": POSITIVE,
          "log_model": BOOLEAN, "register_model": nullable(STRING, "not registered"), "system_metrics": BOOLEAN,
          "log_errors": BOOLEAN}

# data, model and optimizer accept the parameters of their _target_'s __init__; these are the ones
# with limits; the others must match the type of their default.
TARGET_RULES = {
    "data": {"name": STRING,  # checked against the _target_'s sets (_data_name)
             "root": STRING, "download": BOOLEAN, "chunk_size": integer(1), "path": STRING, "drop_last": BOOLEAN,
             "val_size": ANY, "limit_train": ANY, "batch_size": ANY,  # see _data_sizes
             "noise": NON_NEGATIVE, "n_train": integer(1)},  # a toy loss's gradient oracle (descent/nets/toy.py)
    # the networks' ends are sized from the data (descent/nets/networks.py's build); a size given must be the data's
    "model": {"in_features": nullable(integer(1), "taken from the data"),
              "side": nullable(integer(1), "taken from the data"),
              "classes": nullable(integer(2), "taken from the data"),
              "hidden": (lambda v: _is_int(v) and v >= 1 or isinstance(v, list) and all(_is_int(h) and h >= 1 for h in v),
                         "a list of integers >= 1, the hidden layers' widths ([] = none: softmax regression)"),
              "filters": (lambda v: isinstance(v, list) and len(v) >= 1 and all(_is_int(f) and f >= 1 for f in v),
                          "a non-empty list of integers >= 1, the convolutions' channels (as many as the data's images "
                          "leave pixels for after the pools: descent/nets/networks.py)"),
              "init": (lambda v: v in ("keras", "torch"), "one of keras, torch"),
              "loss": ANY, "start": ANY},  # a toy loss (descent/nets/toy.py) or the MLP's: see _toy
    "optimizer": {
        "_partial_": (lambda v: v is True, "true (the module calls it on the model's parameters)"),
        "lr": POSITIVE,
        "momentum": FRACTION,
        "dampening": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(FRACTION[0], v)),
                  "a pair of numbers, each in [0, 1)"),
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
        "adjust_lr_fn": (lambda v: v in (None, "original", "match_rms_adamw", "spectral_unclamped"),
                         "null, original, match_rms_adamw or spectral_unclamped"),
        "muon_params": PATTERNS,
        "adamw_params": PATTERNS,
        "adamw": (lambda v: isinstance(v, dict), "a mapping of torch.optim.AdamW's keys"),  # checked as a section
    },
}
SUPPLIED = {"data": {"seed"}, "model": {"shape"}, "optimizer": {"params"}}  # arguments train.py, the data and the
# module pass themselves


def _show(v) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return repr(v)


def _why(e: Exception) -> str:
    return str(e).splitlines()[0]


def _refused_targets(cfg: DictConfig) -> list[str]:
    """Every _target_ outside the allowed packages, found without importing or resolving anything else."""
    problems = []

    def walk(node, path):
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            if key == "_target_":
                try:
                    target = node[key]
                except InterpolationResolutionError as e:
                    target = f"<cannot be resolved: {_why(e)}>"
                if not (isinstance(target, str) and target.startswith(TARGET_PREFIXES)):
                    problems.append(f"{path}_target_={_show(target)}: refused; "
                                    "_target_ must be in torch.optim, torch.nn or descent")
            elif OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue  # a value we need not resolve here (containers are walked where they are defined)
            elif OmegaConf.is_config(child := node[key]):
                walk(child, f"{path}{key}.")

    walk(cfg, "")
    return problems


def check_targets(cfg: DictConfig) -> None:
    if problems := _refused_targets(cfg):
        raise ConfigError("\n".join(problems))


def _check(node: DictConfig, prefix: str, rules: dict, required, where: str, problems: list) -> dict:
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
                problems.append(f"{name}: cannot be resolved: {_why(e)}")
                continue
            values[key] = value
            test, words = rules[key]
            if not test(value):
                problems.append(f"{name}={_show(value)}: must be {words}")
    for key in required:
        if key not in node or OmegaConf.is_missing(node, key):
            problems.append(f"{prefix}{key}: missing; must be {rules[key][1]}")
    return values


def _target_rules(name: str, node: DictConfig, problems: list) -> tuple[dict, list, str] | None:
    """The keys the section's _target_ accepts, with their rules; None when it has no usable target."""
    if "_target_" not in node:
        problems.append(f"{name}._target_: missing; must name a class in torch.optim, torch.nn or descent")
        return None
    target = OmegaConf.select(node, "_target_", throw_on_resolution_failure=False)
    if not (isinstance(target, str) and target.startswith(TARGET_PREFIXES)):
        return None  # refused by _refused_targets, and never imported
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        problems.append(f"{name}._target_={_show(target)}: cannot be imported ({_why(e)})")
        return None
    if not inspect.isclass(cls):
        problems.append(f"{name}._target_={_show(target)}: must name a class")
        return None
    return _class_rules(name, cls, target)


def _class_rules(name: str, cls, target: str) -> tuple[dict, list, str]:
    """The keys a class's __init__ accepts under section `name`, with their rules, and the required ones."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in SUPPLIED.get(name, ())]
    # a parameter without a rule of ours must at least have the type of its default
    by_default = {p.name: BOOLEAN if isinstance(p.default, bool) else NUMBER if _is_number(p.default) else None
                  for p in params}
    rules = {"_target_": None, **({"_partial_": None} if name == "optimizer" else {}), **by_default}
    rules |= {k: rule for k, rule in TARGET_RULES[name].items() if k in rules}
    required = [p.name for p in params if p.default is p.empty] + (["_partial_"] if name == "optimizer" else [])
    return rules, required, f" for {target}"


def _data_name(node: DictConfig, data: dict) -> tuple[list[str], int | None]:
    """data.name against the table's sets its _target_ reads; returns the problems and the training examples
    the config's data has (descent/data/datasets.py's table; None for a user's file, checked when it is read)."""
    if "n_train" in data:  # a toy loss's oracle (descent/nets/toy.py) says how many draws it makes
        return [], data["n_train"] if _is_int(data["n_train"]) and data["n_train"] >= 1 else None
    target = str(OmegaConf.select(node, "_target_", default=""))
    kind = target.rpartition(".")[2]
    if kind == "DigitsDataModule":
        return [], datasets.TABLE["digits"].n_train
    allowed = {"IDXDataModule": datasets.IDX, "MNISTDataModule": datasets.IDX,
               "TorchvisionDataModule": datasets.TORCHVISION}.get(kind)
    if allowed is None or "name" not in data:
        return [], None
    if data["name"] not in allowed:
        return [f"data.name={_show(data['name'])}: must be one of {', '.join(allowed)} for {target} "
                "(descent/data/datasets.py's table)"], None
    return [], datasets.TABLE[data["name"]].n_train


def _data_sizes(data: dict, total: int | None) -> list[str]:
    """val_size, limit_train and batch_size bound each other: each is checked against those before it, and
    against the data's training examples where the config knows them (a user's file: when it is read)."""
    problems = []
    val_size = data.get("val_size", 0)
    if _is_number(val_size) and not _is_int(val_size) and 0 < val_size < 1:
        val_size = datasets.val_examples(val_size, total) if total else 0  # a fraction of the training examples
    if total is None:
        rule = integer(0)
    else:
        rule = integer(0, total - 1, f"the {total} training examples, minus at least one for training")
    if not rule[0](val_size):
        problems.append(f"data.val_size={_show(data.get('val_size'))}: must be {rule[1]}, or a fraction in (0, 1)")
        val_size = 0  # judge the others as if nothing were held out
    n = total - val_size if total is not None else None
    rule = nullable(integer(1, n, "the training examples left after data.val_size"), "all of them")
    limit = data.get("limit_train")
    if not rule[0](limit):
        problems.append(f"data.limit_train={_show(limit)}: must be {rule[1]}")
    elif limit is not None:
        n = limit
    rule = nullable(integer(1, n, "the training examples after val_size and limit_train"), "the whole training set")
    if "batch_size" in data and not rule[0](data["batch_size"]):
        problems.append(f"data.batch_size={_show(data['batch_size'])}: must be {rule[1]}")
    return problems


def _nesterov(opt: dict) -> list[str]:
    momentum, dampening = opt.get("momentum", 0), opt.get("dampening", 0)
    if opt.get("nesterov") is True and not (_is_number(momentum) and momentum > 0 and dampening == 0):
        return [f"optimizer.nesterov=true: must be false unless optimizer.momentum > 0 and optimizer.dampening = 0 "
                f"(momentum is {_show(momentum)}, dampening {_show(dampening)})"]
    return []


def _toy(model: dict, target: str) -> list[str]:
    """A toy loss's name and its start's coordinates (one per dimension of the loss); the MLP's loss."""
    if "loss" not in model:
        return []
    if not target.startswith("descent.nets.toy."):
        from descent.nets import LOSSES

        if model["loss"] not in LOSSES:
            return [f"model.loss={_show(model['loss'])}: must be one of {', '.join(LOSSES)}"]
        return []
    from descent.nets.toy import LOSSES

    loss, start = model["loss"], model.get("start")
    if loss not in LOSSES:
        return [f"model.loss={_show(loss)}: must be one of {', '.join(LOSSES)}"]
    dim = LOSSES[loss].dim
    if not (isinstance(start, list) and len(start) == dim and all(map(_is_number, start))):
        return [f"model.start={_show(start)}: must be a list of {dim} finite number(s), the point where {loss} "
                "starts"]
    return []


def _target_class(node: DictConfig):
    """The class of a section whose _target_ validate() found importable (so this imports nothing new)."""
    module, _, attr = node._target_.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _optimizer(cfg: DictConfig, values: dict, problems: list) -> list[str]:
    """What an optimizer asks of the rest of the config: a closure needs batches of more than one example;
    MuonAdamW's nested adamw keys and its parameter groups, against the model's parameter names."""
    import torch

    from descent.nets.optim import MuonAdamW, needs_closure

    cls, found = _target_class(cfg.optimizer), []
    batch_size = OmegaConf.select(cfg, "data.batch_size", throw_on_resolution_failure=False)
    if needs_closure(cls) and batch_size == 1:
        found.append(f"data.batch_size=1 (batching=online): refused with optimizer {cfg.optimizer._target_}, whose "
                     "step evaluates its batch several times through a closure (line search, curvature pairs): "
                     "allowed are null (batching=full) or a batch of at least 2 examples (e.g. data.batch_size=10000)")
    if issubclass(cls, MuonAdamW):
        if isinstance(values.get("adamw"), dict):
            rules, _, where = _class_rules("optimizer", torch.optim.AdamW, "torch.optim.AdamW")
            supplied = ("_target_", "_partial_", "capturable")  # MuonAdamW builds it and passes capturable itself
            _check(cfg.optimizer.adamw, "optimizer.adamw.", {k: r for k, r in rules.items() if k not in supplied},
                   [], where, problems)
        groups = {k: values[k] for k in ("muon_params", "adamw_params") if k in values}
        if len(groups) == 2 and all(PATTERNS[0](v) for v in groups.values()) and not any(
                p.startswith("model.") for p in problems):
            from hydra.utils import instantiate

            with torch.device("meta"):  # the parameters' names and shapes, without their memory
                net = instantiate(cfg.model)
            try:
                MuonAdamW(net.named_parameters(), muon_params=groups["muon_params"],
                          adamw_params=groups["adamw_params"])
            except ValueError as e:
                found += ["optimizer." + line.replace(", adamw_params", ", optimizer.adamw_params")
                          for line in str(e).splitlines()]
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of the config; import only allowed _target_s."""
    problems = _refused_targets(cfg)
    top_rules = {**TOP, **dict.fromkeys(SECTIONS)}
    _check(cfg, "", top_rules, [k for k in TOP if k not in OPTIONAL], " at the top level", problems)
    for name in SECTIONS:
        node = cfg.get(name)
        if not isinstance(node, DictConfig):
            problems.append(f"{name}={_show(node)}: must be a mapping of {name}.* keys")
            continue
        if name in ("trainer", "logger", "sweep"):
            rules = {"trainer": TRAINER, "logger": LOGGER, "sweep": SWEEP}[name]
            _check(node, f"{name}.", rules, list(rules), "", problems)
        elif accepted := _target_rules(name, node, problems):
            values = _check(node, f"{name}.", *accepted, problems)
            if name == "data":
                found, total = _data_name(node, values)
                problems += found + _data_sizes(values, total)
            if name == "model":
                problems += _toy(values, str(OmegaConf.select(node, "_target_", default="")))
            if name == "optimizer":
                problems += _nesterov(values) + _optimizer(cfg, values, problems)
    problems += _toy_pair(cfg)
    targets, top = OmegaConf.select(cfg, "sweep.targets", default=None), OmegaConf.select(cfg, "sweep.target_acc")
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    if SWEEP["targets"][0](targets) and SWEEP["target_acc"][0](top) and any(t > top for t in targets):
        problems.append(f"sweep.targets={_show(targets)}: each must be <= sweep.target_acc={top} (the run stops "
                        "there, so a higher one is never reached)")
    if problems:
        raise ConfigError("\n".join(problems))


LR_TAG = "lr.source"  # a preset's rate for data and a model it has no searched rate for: where it came from


def lr_not_searched(cfg: DictConfig, choices: dict) -> str | None:
    """A preset with searched learning rates (lr_searched, per <data>-<model>) run on data or a model it has no
    rate for runs another combination's (its oc.select default): which rate, and whose. None otherwise."""
    searched = OmegaConf.select(cfg, "lr_searched")
    by = next((group for group in ("batching", "optimizer") if f"lr_by_{group}" in cfg), None)
    if searched is None or by is None:
        return None
    combo, option = f"{choices.get('data')}-{choices.get('model')}", choices.get(by)
    searched = OmegaConf.to_container(searched, resolve=True)
    if option in searched.get(combo, {}):
        return None
    lr = OmegaConf.select(cfg, "optimizer.lr")
    whose = [c for c, rates in searched.items() if rates.get(option) == lr]
    came = f"the rate searched for {whose[0]}" if whose else "given on the command line"
    return f"no searched learning rate for {combo} with {by}={option}; runs optimizer.lr={lr}, {came}"


def _toy_pair(cfg: DictConfig) -> list[str]:
    """A toy loss (descent/nets/toy.py) and its gradient oracle go together: neither trains with anything else."""
    targets = {name: OmegaConf.select(cfg, f"{name}._target_", default=None) for name in ("data", "model")}
    toys = {name: str(t).startswith(("descent.nets.toy.", "descent.data.toy.", "descent.data.ToyData"))
            for name, t in targets.items()}
    if toys["data"] == toys["model"]:
        return []
    return [f"data._target_={_show(targets['data'])} with model._target_={_show(targets['model'])}: a toy loss "
            "(model=double_well, rosenbrock) trains only on its gradient oracle (data=toy), and data=toy only a toy "
            "loss"]


def validate_sweep(config: DictConfig) -> None:
    """Compose and check every job of a multirun before the first one starts (BasicSweeper's grid).

    A sweep of a hundred jobs should not run ninety and stop at a typo; each bad job is named by its
    overrides, with its problems.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if target.startswith("hydra_plugins.descent_optuna_sweeper."):
        return validate_study(config)
    if not target.endswith(".BasicSweeper"):
        return  # another sweeper picks its jobs as it goes: each job checks itself
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(config.hydra.overrides.task))
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    [jobs] = BasicSweeper.split_arguments(parsed, None)
    problems, hydra_config = [], HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        for num, overrides in enumerate(jobs):
            name = " ".join(o for o in overrides if o.split("=", 1)[0] in swept) or " ".join(overrides)
            try:
                job = loader.load_sweep_config(config, list(overrides))
                hydra_config.set_config(job)  # the presets' ${hydra:runtime.choices...} resolve per job
                validate(OmegaConf.masked_copy(job, [k for k in job if k != "hydra"]))
            except (ConfigError, HydraException) as e:
                problems.append(f"job #{num} ({name}):\n  " + str(e).replace("\n", "\n  "))
    finally:
        hydra_config.cfg = saved
    if problems:
        raise ConfigError(f"{len(problems)} of the sweep's {len(jobs)} jobs are invalid; no job was started:\n"
                          + "\n".join(problems))


def _candidates(override) -> list:
    """The values of a search-space override a study can reach: an interval's two ends, every choice,
    every value of a range."""
    from hydra.core.override_parser.types import Transformer

    if override.is_interval_sweep():
        return [override.value().start, override.value().end]
    return list(override.sweep_iterator(transformer=Transformer.encode))[:1000]


def validate_study(config: DictConfig) -> None:
    """Check an Optuna study before its first trial (hydra/sweeper=optuna): the sweeper's keys, each
    interval's bounds and each choice or range value composed into a job and validated like a grid's jobs,
    validation data for the objective. Every problem at once."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra_plugins.descent_optuna_sweeper._impl import create_optuna_distribution_from_override

    sweeper, problems = config.hydra.sweeper, []
    for key, rule in {"n_trials": integer(1), "n_jobs": integer(1), "storage": STRING,
                      "study_name": STRING}.items():
        value = OmegaConf.select(sweeper, key, default=None)
        if not rule[0](value):
            why = " (the jobs find their trial in the study's database)" if key == "storage" else ""
            problems.append(f"hydra.sweeper.{key}={_show(value)}: must be {rule[1]}{why}")
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(config.hydra.overrides.task))
    space, fixed = {}, [o.input_line for o in parsed if not o.is_sweep_override()]
    for o in parsed:
        if not o.is_sweep_override():
            continue
        text = o.input_line or o.get_key_element()
        try:
            create_optuna_distribution_from_override(o)  # the sweeper's own reading: optuna refuses low > high,
            space[o.get_key_element()] = (text, _candidates(o))  # a log scale from 0 or below, ...
        except (ValueError, TypeError, NotImplementedError, AssertionError) as e:
            problems.append(f"{text}: not a search space Optuna takes: {_why(e)}")
    # a grid of studies (hydra.sweeper.grid): each of its values is a value the jobs run with
    grid = OmegaConf.select(sweeper, "grid", default=None) or {}
    for o in OverridesParser.create(config_loader=loader).parse_overrides([f"{k}={v}" for k, v in grid.items()]):
        key = o.get_key_element()
        text = f"hydra.sweeper.grid.{key}={grid[key]}"
        if key in space or key in {f.split("=", 1)[0] for f in fixed}:
            problems.append(f"{text}: {key} is also set by the search space or the command line; give it in one place")
            continue
        space[key] = (text, _candidates(o) if o.is_sweep_override() else [o.value()])
    # the settings alone, then each value with the others left at the settings' (one job per value: each
    # problem named by the value that makes it)
    jobs = [({}, "the study's settings")] + [({key: v}, f"{text}: value {_show(v)}")
                                             for key, (text, values) in space.items() for v in values]
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        for change, name in jobs:
            try:
                job = loader.load_sweep_config(config, fixed + [f"{k}={v}" for k, v in change.items()])
                hydra_config.set_config(job)
                task = OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])
                if not change:  # the objective is measured on the validation data
                    val_size, objective = task.data.get("val_size", 0), task.get("sweep", {}).get("objective")
                    if not (_is_int(val_size) and val_size > 0):
                        problems.append(f"data.val_size={_show(val_size)}: must be > 0 in an Optuna study "
                                        f"(its objective, sweep.objective={objective}, is measured on the "
                                        "validation data; e.g. data.val_size=10000)")
                validate(task)
            except (ConfigError, HydraException) as e:
                problems.append(f"{name}:\n  " + str(e).replace("\n", "\n  "))
    finally:
        hydra_config.cfg = saved
    if problems:
        raise ConfigError("the Optuna study is invalid; no trial was started:\n" + "\n".join(problems))


# What `resume=<run> key=value` may change: how the run is carried on, shown and recorded, never what it
# computes. Resumed with any of these, the run's numbers are those of the same run left alone (its data
# order is a function of seed and epoch, so more epochs continue the order the longer run would have had).
# Everything else is refused when it differs from the run's record: data.* (other examples, order or
# checkpoint boundaries), model.*, optimizer.*, batching, seed, trainer.log_every_examples and
# val_every_examples (the metric axes), trainer.accelerator, cuda_graphs, compile_optimizer and
# flush_denormal (other kernels: other numbers in the last bits), logger.experiment_name (a run stays in
# its experiment) and the experiment presets.
RESUME_MAY_CHANGE = {
    "trainer.max_epochs": "the budget, which a resume may raise (never lower)",
    "trainer.progress_bar": "display only",
    "trainer.threads": "the machine's share of CPUs, which may differ where the run goes on (the numbers "
                       "change only in float summation order)",
    "trainer.checkpoint_every_seconds": "how often the state is saved (a resume from any checkpoint gives the "
                                        "same numbers: tests/test_resume.py)",
    "trainer.max_updates": "the budget in updates (as max_epochs is in examples)",
    "trainer.noise_scale": "what is measured beside the run (never its numbers: tests/test_noise.py)",
    "trainer.noise_at_targets": "what is measured beside the run (never its numbers: tests/test_noise.py)",
    "logger.tracking_uri": "where the run is recorded (it is looked up there)",
    "logger.log_checkpoint": "what is recorded",
    "logger.outage_seconds": "how long a tracking server may be away",
    "logger.log_model": "what is recorded",
    "logger.register_model": "what is recorded",
    "logger.system_metrics": "what is recorded",
    "logger.log_errors": "what is recorded",
    "data.root": "where the data files are (other files are refused by their checks and the checkpoint's)",
    "data.download": "where missing data files come from",
}


def resume_config(cfg: DictConfig, choices: dict, overrides: list[str], recorded: DictConfig,
                  recorded_choices: dict, run: str, status: str) -> tuple[DictConfig, dict]:
    """The config a resumed run runs with: its record, with the command line's RESUME_MAY_CHANGE keys.

    The overrides are Hydra's own record of the command line (hydra.overrides.task), so a default
    changed in conf/ since the run started is not mistaken for the user's wish. An override that names
    another key is refused unless it gives the recorded value. Returns (config, {key: (recorded, given)}
    for what changed).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = OmegaConf.merge(recorded, {"resume": cfg.resume})
    changed, refused = {}, []
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    # where the run was found is where it goes on being recorded, given on the command line or not
    for key in dict.fromkeys(keys + ["logger.tracking_uri"]):
        if key == "resume":
            continue
        if key in choices:  # a config group: optimizer=sgd, batching=online, experiment=...
            if key not in recorded_choices and choices[key] is not None:
                refused.append(f"{key}={choices[key]}: the run's record has no {key} "
                               "(a preset changes what the run measures)")
            elif key in recorded_choices and choices[key] != recorded_choices[key]:
                refused.append(f"{key}: recorded {recorded_choices[key]}, given {choices[key]}")
            continue
        was = OmegaConf.select(recorded, key, default=None)
        given = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(given):
            given = OmegaConf.to_container(given, resolve=True)
            was = OmegaConf.to_container(was, resolve=True) if OmegaConf.is_config(was) else was
        if given == was:
            continue
        if key not in RESUME_MAY_CHANGE:
            refused.append(f"{key}: recorded {_show(was)}, given {_show(given)}")
        elif key == "trainer.max_epochs" and _is_int(was) and _is_int(given) and given < was:
            refused.append(f"{key}: recorded {was}, given {given}: a resume may raise it, never lower it")
        else:
            OmegaConf.update(merged, key, given, force_add=True)
            changed[key] = (was, given)
    if refused:
        raise ConfigError(
            f"resume={run}: the run would no longer measure what it recorded; these overrides differ from its "
            "record:\n  " + "\n  ".join(refused) + "\nA resume may change only " + ", ".join(RESUME_MAY_CHANGE)
            + "; for the others start a new run.")
    if status == "FINISHED" and "trainer.max_epochs" not in changed:
        raise ConfigError(f"resume={run}: the run is FINISHED after trainer.max_epochs="
                          f"{_show(recorded.trainer.max_epochs)}; continue it with a larger trainer.max_epochs, "
                          "or start a new run")
    return merged, changed

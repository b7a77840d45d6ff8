"""The checks across keys (data sizes, a toy and its oracle, an optimizer and its batches), and validate()."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from descent.config import schema
from descent.config.rules import PATTERNS, ConfigError, integer, is_int, is_number, nullable, show
from descent.data import datasets
from descent.tracking import names

LR_TAG = names.LR_SOURCE  # a preset's rate for data and a model it has no searched rate for: where it came from


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of the config; import only allowed _target_s."""
    problems = schema.refused_targets(cfg)
    known = schema.current()
    schema.check(cfg, "", known.top, known.required, " at the top level", problems)
    for name in [*known.sections, *schema.TARGET_RULES]:
        node = cfg.get(name)
        if not isinstance(node, DictConfig):
            problems.append(f"{name}={show(node)}: must be a mapping of {name}.* keys")
            continue
        if name in known.sections:
            rules = known.sections[name]
            schema.check(node, f"{name}.", rules, list(rules), "", problems)
        elif accepted := schema.target_rules(name, node, problems):
            values = schema.check(node, f"{name}.", *accepted, problems)
            if name == "data":
                found, total = data_name(node, values)
                problems += found + data_sizes(values, total)
            if name == "model":
                problems += toy(values, str(OmegaConf.select(node, "_target_", default="")))
            if name == "optimizer":
                problems += nesterov(values) + optimizer(cfg, values, problems)
    problems += toy_pair(cfg) + targets_below_the_top(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def data_name(node: DictConfig, data: dict) -> tuple[list[str], int | None]:
    """data.name against the table's sets its _target_ reads; returns the problems and the training examples
    the config's data has (descent/data/datasets.py's table; None for a user's file, checked when it is read)."""
    if "n_train" in data:  # a toy loss's oracle (descent/nets/toy.py) says how many draws it makes
        return [], data["n_train"] if is_int(data["n_train"]) and data["n_train"] >= 1 else None
    target = str(OmegaConf.select(node, "_target_", default=""))
    kind = target.rpartition(".")[2]
    if kind == "DigitsDataModule":
        return [], datasets.TABLE["digits"].n_train
    allowed = {
        "IDXDataModule": datasets.IDX,
        "MNISTDataModule": datasets.IDX,
        "TorchvisionDataModule": datasets.TORCHVISION,
    }.get(kind)
    if allowed is None or "name" not in data:
        return [], None
    if data["name"] not in allowed:
        return [
            f"data.name={show(data['name'])}: must be one of {', '.join(allowed)} for {target} "
            "(descent/data/datasets.py's table)"
        ], None
    return [], datasets.TABLE[data["name"]].n_train


def data_sizes(data: dict, total: int | None) -> list[str]:
    """val_size, limit_train and batch_size bound each other: each is checked against those before it, and
    against the data's training examples where the config knows them (a user's file: when it is read)."""
    problems = []
    val_size = data.get("val_size", 0)
    if is_number(val_size) and not is_int(val_size) and 0 < val_size < 1:
        val_size = datasets.val_examples(val_size, total) if total else 0  # a fraction of the training examples
    if total is None:
        rule = integer(0)
    else:
        rule = integer(0, total - 1, f"the {total} training examples, minus at least one for training")
    if not rule[0](val_size):
        problems.append(f"data.val_size={show(data.get('val_size'))}: must be {rule[1]}, or a fraction in (0, 1)")
        val_size = 0  # judge the others as if nothing were held out
    n = total - val_size if total is not None else None
    rule = nullable(integer(1, n, "the training examples left after data.val_size"), "all of them")
    limit = data.get("limit_train")
    if not rule[0](limit):
        problems.append(f"data.limit_train={show(limit)}: must be {rule[1]}")
    elif limit is not None:
        n = limit
    rule = nullable(integer(1, n, "the training examples after val_size and limit_train"), "the whole training set")
    if "batch_size" in data and not rule[0](data["batch_size"]):
        problems.append(f"data.batch_size={show(data['batch_size'])}: must be {rule[1]}")
    return problems


def nesterov(opt: dict) -> list[str]:
    momentum, dampening = opt.get("momentum", 0), opt.get("dampening", 0)
    if opt.get("nesterov") is True and not (is_number(momentum) and momentum > 0 and dampening == 0):
        return [
            f"optimizer.nesterov=true: must be false unless optimizer.momentum > 0 and optimizer.dampening = 0 "
            f"(momentum is {show(momentum)}, dampening {show(dampening)})"
        ]
    return []


def toy(model: dict, target: str) -> list[str]:
    """A toy loss's name and its start's coordinates (one per dimension of the loss); the MLP's loss."""
    if "loss" not in model:
        return []
    # torch (1.5 s of CPU to import) and, for a toy, descent.nets.toy (torch and lightning: 5 s) only when a config
    # is checked, never when descent.config is imported (src/compare.py's path, through tracking/store.py)
    if not target.startswith("descent.nets.toy."):
        from descent.nets import LOSSES

        if model["loss"] not in LOSSES:
            return [f"model.loss={show(model['loss'])}: must be one of {', '.join(LOSSES)}"]
        return []
    from descent.nets.toy import LOSSES

    loss, start = model["loss"], model.get("start")
    if loss not in LOSSES:
        return [f"model.loss={show(loss)}: must be one of {', '.join(LOSSES)}"]
    dim = LOSSES[loss].dim
    if not (isinstance(start, list) and len(start) == dim and all(map(is_number, start))):
        return [f"model.start={show(start)}: must be a list of {dim} finite number(s), the point where {loss} starts"]
    return []


def optimizer(cfg: DictConfig, values: dict, problems: list) -> list[str]:
    """What an optimizer asks of the rest of the config: a closure needs batches of more than one example;
    MuonAdamW's nested adamw keys and its parameter groups, against the model's parameter names."""
    import torch  # as in toy(): only when a config is checked (its _target_ imported torch already)

    from descent.nets.optim import MuonAdamW, needs_closure

    cls, found = schema.target_class(cfg.optimizer), []
    batch_size = OmegaConf.select(cfg, "data.batch_size", throw_on_resolution_failure=False)
    if needs_closure(cls) and batch_size == 1:
        found.append(
            f"data.batch_size=1 (batching=online): refused with optimizer {cfg.optimizer._target_}, whose "
            "step evaluates its batch several times through a closure (line search, curvature pairs): "
            "allowed are null (batching=full) or a batch of at least 2 examples (e.g. data.batch_size=10000)"
        )
    if issubclass(cls, MuonAdamW):
        if isinstance(values.get("adamw"), dict):
            rules, _, where = schema.class_rules("optimizer", torch.optim.AdamW, "torch.optim.AdamW")
            supplied = ("_target_", "_partial_", "capturable")  # MuonAdamW builds it and passes capturable itself
            schema.check(
                cfg.optimizer.adamw,
                "optimizer.adamw.",
                {k: r for k, r in rules.items() if k not in supplied},
                [],
                where,
                problems,
            )
        groups = {k: values[k] for k in ("muon_params", "adamw_params") if k in values}
        if (
            len(groups) == 2
            and all(PATTERNS[0](v) for v in groups.values())
            and not any(p.startswith("model.") for p in problems)
        ):
            with torch.device("meta"):  # the parameters' names and shapes, without their memory
                net = instantiate(cfg.model)
            try:
                MuonAdamW(
                    net.named_parameters(), muon_params=groups["muon_params"], adamw_params=groups["adamw_params"]
                )
            except ValueError as e:
                found += [
                    "optimizer." + line.replace(", adamw_params", ", optimizer.adamw_params")
                    for line in str(e).splitlines()
                ]
    return found


def toy_pair(cfg: DictConfig) -> list[str]:
    """A toy loss (descent/nets/toy.py) and its gradient oracle go together: neither trains with anything else."""
    targets = {name: OmegaConf.select(cfg, f"{name}._target_", default=None) for name in ("data", "model")}
    toys = {
        name: str(t).startswith(("descent.nets.toy.", "descent.data.toy.", "descent.data.ToyData"))
        for name, t in targets.items()
    }
    if toys["data"] == toys["model"]:
        return []
    return [
        f"data._target_={show(targets['data'])} with model._target_={show(targets['model'])}: a toy loss "
        "(model=double_well, rosenbrock) trains only on its gradient oracle (data=toy), and data=toy only a toy "
        "loss"
    ]


def targets_below_the_top(cfg: DictConfig) -> list[str]:
    """sweep.targets are crossed on the way to sweep.target_acc, where the run stops."""
    targets, top = OmegaConf.select(cfg, "sweep.targets", default=None), OmegaConf.select(cfg, "sweep.target_acc")
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    rules = schema.SECTION_RULES["sweep"]
    if rules["targets"][0](targets) and rules["target_acc"][0](top) and any(t > top for t in targets):
        return [
            f"sweep.targets={show(targets)}: each must be <= sweep.target_acc={top} (the run stops "
            "there, so a higher one is never reached)"
        ]
    return []


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

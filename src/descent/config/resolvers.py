"""conf/'s ${descent.*:...} resolvers, registered by register(): the entry points call it before Hydra composes."""

from __future__ import annotations

from omegaconf import OmegaConf

from descent.config.schema import OBJECTIVES
from descent.data import datasets


def direction(objective) -> str:
    """conf/hydra/sweeper/optuna.yaml: direction: ${descent.direction:${sweep.objective}}"""
    return OBJECTIVES.get(objective, "minimize")


def times_2_over_l(ratio, loss) -> float:
    """conf/experiment/step_size.yaml: optimizer.lr: ${descent.times_2_over_L:${lr_ratio},${model.loss}}, a learning
    rate as a multiple of 2/L, L the toy loss's largest curvature at its global minimum."""
    # the toy losses are torch functions and descent.nets.toy imports the data modules (lightning): 5 s of CPU, paid
    # when this resolves (experiment=step_size), not when the resolvers are registered
    from descent.nets.toy import LOSSES

    return float(ratio) * 2 / LOSSES[loss].L


RESOLVERS = {
    "descent.direction": direction,
    # conf/experiment/*.yaml: data.val_size: ${descent.held_out:...}, the validation examples a study holds out of
    # the data's training set (descent/data/datasets.py: MNIST's last 10000)
    "descent.held_out": datasets.held_out,
    # conf/experiment/edge_of_stability.yaml: data.limit_train: ${descent.at_most:5000,...}, at most the data's examples
    "descent.at_most": datasets.at_most,
    "descent.times_2_over_L": times_2_over_l,
}


def register() -> None:
    """Make conf/'s ${descent.*:...} resolvable (again: replacing is harmless)."""
    for name, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)

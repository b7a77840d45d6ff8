"""Measurements of the optimisation, run by the loop at each validation point (Classifier.measures).

Each is an object called with a `Point` (what it measures, handed by the loop) that returns {metric: value}
(logged at step = examples seen; an empty dict when it is not due); it reads the weights and the data and
changes nothing the training uses (weights, gradients, optimizer state, random state). Its metric names are
in descent/tracking/names.py. A new one is a module here and its `_target_` under `trainer.measures` in the
config (docs/internals/layout.md); the built-in ones are switched on by their own trainer.* keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from descent.measure import curvature_noise as cn
from descent.measure.noise import NoiseAtTargets, NoiseScale, linear_layers
from descent.measure.sharpness import Sharpness
from descent.measure.toy import Trace
from descent.nets.toy import Toy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """What a measurement gets at a validation point: what it measures, handed by the loop (no reaching through the
    trainer). The tensors are the loop's own (on its device): a measurement reads them and changes none of them."""

    net: Any  # the network (torch.nn.Module)
    criterion: Any  # the run's loss: (scores, labels) -> mean loss (cross-entropy, or mse)
    optimizer: Any  # the torch optimizer: its param_groups (lr, momentum) and state (Adam's v)
    x_train: Any  # the training inputs, N x features
    y_train: Any  # the training labels, N
    updates: int  # optimizer updates so far
    examples: int  # training examples seen so far (the metrics' step)
    latest: dict = field(default_factory=dict)  # this point's logged metrics (val/acc: the loop logs it first)


def from_config(cfg, net) -> list:
    """The measurements the config asks for: sharpness (trainer.sharpness_every), a toy loss's trace, the
    gradient noise scale (trainer.noise_scale: a classifier's, on by default; trainer.noise_at_targets: with its
    error over the whole training set at each target's first crossing; trainer.noise_hessian_at_targets and
    noise_preconditioned_at_targets: B_noise and the preconditioned noise scale there, curvature_noise.py), and each of trainer.measures (name ->
    {_target_: descent.measure.<module>.<Class>, its arguments}), instantiated as configured."""
    found = []
    if isinstance(net, Toy):  # the point on the curve or surface and the step that moved it
        found.append(Trace(net))
    elif OmegaConf.select(cfg, "trainer.noise_scale", default=False):  # absent from runs recorded before it
        try:  # on by default: a net it cannot measure (the convnet) trains without it, and says so
            linear_layers(net)
            found.append(NoiseScale(probe=cfg.trainer.noise_probe, seed=cfg.seed))
        except ValueError as e:
            log.warning("%s: not measured", e)
    if OmegaConf.select(cfg, "trainer.noise_at_targets", default=False):
        linear_layers(net)  # a net it cannot measure is refused here: this one was asked for
        targets = [*(OmegaConf.select(cfg, "sweep.targets", default=None) or ()), cfg.sweep.target_acc]
        found.append(NoiseAtTargets([t for t in targets if t <= cfg.sweep.target_acc]))
    found += _curvature_noise(cfg)
    if cfg.trainer.get("sharpness_every"):
        found.append(Sharpness(cfg.trainer.sharpness_every, cfg.trainer.sharpness_subset))
    for spec in (OmegaConf.select(cfg, "trainer.measures", default=None) or {}).values():
        found.append(instantiate(spec))
    return found


def _curvature_noise(cfg) -> list:
    """B_noise and B_precond at the target crossings; B_precond only where the optimizer has a diagonal
    preconditioner (a preset sweeping optimizers asks for it on all of them: the others run without it, and say so)."""
    hessian = OmegaConf.select(cfg, "trainer.noise_hessian_at_targets", default=False)
    precond = OmegaConf.select(cfg, "trainer.noise_preconditioned_at_targets", default=False)
    if not (hessian or precond):
        return []
    targets = [*(OmegaConf.select(cfg, "sweep.targets", default=None) or ()), cfg.sweep.target_acc]
    targets = [t for t in targets if t <= cfg.sweep.target_acc]
    found = []
    if hessian:
        subset = OmegaConf.select(cfg, "trainer.noise_hessian_subset", default=4096)  # absent from older records
        found.append(cn.HessianNoiseAtTargets(targets, subset=subset))
    target = OmegaConf.select(cfg, "optimizer._target_", default=None)
    if precond and target in cn.PRECONDITIONED:
        found.append(cn.PreconditionedNoiseAtTargets(targets))
    elif precond:
        log.warning(
            "trainer.noise_preconditioned_at_targets: %s has no diagonal preconditioner (measured for %s): not "
            "measured",
            target,
            ", ".join(cn.PRECONDITIONED),
        )
    return found

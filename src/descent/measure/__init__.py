"""Measurements of the optimisation, run by the loop at each validation point (Classifier.measures).

Each is an object called with the LightningModule that returns {metric: value} (logged at step = examples
seen; an empty dict when it is not due); it reads the weights and the data and changes nothing the training
uses (weights, gradients, optimizer state, random state).
"""

from __future__ import annotations


def from_config(cfg, net) -> list:
    """The measurements the config asks for: sharpness (trainer.sharpness_every), a toy loss's trace, the
    gradient noise scale (trainer.noise_scale: a classifier's, on by default; trainer.noise_at_targets: with its
    error over the whole training set at each target's first crossing; trainer.noise_hessian_at_targets and
    noise_preconditioned_at_targets: B_noise and the preconditioned noise scale there, curvature_noise.py)."""
    from omegaconf import OmegaConf

    from descent import toy

    found = []
    if isinstance(net, toy.Toy):  # the point on the curve or surface and the step that moved it
        found.append(toy.Trace(net))
    elif OmegaConf.select(cfg, "trainer.noise_scale", default=False):  # absent from runs recorded before it
        from descent.measure.noise import NoiseScale, linear_layers

        try:  # on by default: a net it cannot measure (the convnet) trains without it, and says so
            linear_layers(net)
            found.append(NoiseScale(probe=cfg.trainer.noise_probe))
        except ValueError as e:
            import logging

            logging.getLogger("descent").warning("%s: not measured", e)
    if OmegaConf.select(cfg, "trainer.noise_at_targets", default=False):
        from descent.measure.noise import NoiseAtTargets, linear_layers

        linear_layers(net)  # a net it cannot measure is refused here: this one was asked for
        targets = [*(OmegaConf.select(cfg, "sweep.targets", default=None) or ()), cfg.sweep.target_acc]
        found.append(NoiseAtTargets([t for t in targets if t <= cfg.sweep.target_acc]))
    found += _curvature_noise(cfg)
    if cfg.trainer.get("sharpness_every"):
        from descent.measure.sharpness import Sharpness

        found.append(Sharpness(cfg.trainer.sharpness_every, cfg.trainer.sharpness_subset))
    return found


def _curvature_noise(cfg) -> list:
    """B_noise and B_precond at the target crossings; B_precond only where the optimizer has a diagonal
    preconditioner (a preset sweeping optimizers asks for it on all of them: the others run without it, and say so)."""
    from omegaconf import OmegaConf

    hessian = OmegaConf.select(cfg, "trainer.noise_hessian_at_targets", default=False)
    precond = OmegaConf.select(cfg, "trainer.noise_preconditioned_at_targets", default=False)
    if not (hessian or precond):
        return []
    from descent.measure import curvature_noise as cn

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
        import logging

        logging.getLogger("descent").warning(
            "trainer.noise_preconditioned_at_targets: %s has no diagonal preconditioner (measured for %s): not "
            "measured", target, ", ".join(cn.PRECONDITIONED))
    return found

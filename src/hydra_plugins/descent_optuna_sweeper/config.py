# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class GridSamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/generated/optuna.samplers.GridSampler.html
    """

    _target_: str = "optuna.samplers.GridSampler"
    # search_space will be populated at run time based on hydra.sweeper.params
    _partial_: bool = True
    seed: Optional[int] = None  # descent: the order of the grid's points


@dataclass
class TPESamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/generated/optuna.samplers.TPESampler.html
    """

    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None

    consider_prior: Optional[bool] = None
    prior_weight: Optional[float] = None
    consider_magic_clip: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    warn_independent_sampling: Optional[bool] = None


@dataclass
class RandomSamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/generated/optuna.samplers.RandomSampler.html
    """

    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/generated/optuna.samplers.CmaEsSampler.html
    """

    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None

    x0: Optional[Dict[str, Any]] = None
    sigma0: Optional[float] = None
    independent_sampler: Optional[Any] = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Optional[Any] = None
    inc_popsize: int = 2
    use_separable_cma: bool = False
    source_trials: Optional[Any] = None


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/generated/optuna.samplers.NSGAIISampler.html
    """

    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = None

    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Optional[Any] = None


@dataclass
class GPSamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/samplers/generated/optuna.samplers.GPSampler.html
    """

    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None

    independent_sampler: Optional[Any] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Optional[Any] = None
    warn_independent_sampling: bool = True


@dataclass
class QMCSamplerConfig(SamplerConfig):
    """
    https://optuna.readthedocs.io/en/stable/reference/samplers/generated/optuna.samplers.QMCSampler.html
    """

    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None

    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Optional[Any] = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class ProtocolSamplerConfig(SamplerConfig):
    """descent: the batch-size study's protocol per cell of hydra.sweeper.grid (descent/sweep/protocol.py): the rate
    searched on the first seed (x`coarse` while the best is at an edge of what was tried, then `fine` (√2) on
    both sides of the best, for every target the runs record), then each chosen rate on the other seeds, never
    pruned. The seeds are hydra.sweeper.params.seed's choices, the rates' bounds optimizer.lr's interval;
    n_trials caps the trials per cell, which ends when the protocol has nothing left to run."""

    _target_: str = "descent.sweep.protocol.Protocol"
    lr_param: str = "optimizer.lr"
    seed_param: str = "seed"
    # the first rate: a number, a mapping of a cell's value (an optimizer's name; `default`) to one, or None
    # (the geometric middle of the rate's bounds)
    start: Any = None
    coarse: float = 4.0  # the step while the best rate is the largest (smallest) tried
    fine: float = 1.4142135623730951  # the refinement around the best: √2
    max_search: int = 16  # search trials per cell at most (then the cell measures what it found)
    warm: Optional[str] = None  # a grid key (data.batch_size): start from the rate the nearest cell along it chose
    warm_power: float = 0.5  # ... times (B / B')^warm_power (0.5: the square-root rule)
    # a search trial that has not reached the lowest target after this many times the fewest updates the nearest
    # smaller cell along `warm` took to it is pruned (a rate that diverged or stalls); None: off
    neighbour_bound: Optional[float] = None
    # grid values of the cell that also runs the reference trajectory ({data.batch_size: 128}): the first seed at
    # the chosen rate once more with reference_param true
    reference: Any = None
    reference_param: str = "trainer.noise_at_targets"
    seed: Optional[int] = None  # unused (the protocol is deterministic); the sweeper moves it on like the others'


defaults = [{"sampler": "tpe"}]


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.descent_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: defaults)
    # descent: sampler and pruner reach the sweeper as configs (instantiated once the study is known)
    _recursive_: bool = False

    # Sampling algorithm
    # Please refer to the reference for further details
    # https://optuna.readthedocs.io/en/stable/reference/samplers.html
    sampler: SamplerConfig = MISSING

    # Direction of optimization
    # Union[Direction, List[Direction]]
    direction: Any = Direction.minimize

    # Storage URL to persist optimization results
    # For example, you can use SQLite if you set 'sqlite:///example.db'
    # Please refer to the reference for further details
    # https://optuna.readthedocs.io/en/stable/reference/storages.html
    storage: Optional[Any] = None

    # Name of study to persist optimization results
    study_name: Optional[str] = None

    # Total number of function evaluations
    n_trials: int = 20

    # Number of parallel workers
    n_jobs: int = 2

    # Maximum authorized failure rate for a batch of parameters
    max_failure_rate: float = 0.0

    params: Optional[Dict[str, str]] = None

    # Allow custom trial configuration via Python methods.
    # If given, `custom_search_space` should be a an instantiate-style dotpath targeting
    # a callable with signature Callable[[DictConfig, optuna.trial.Trial], None].
    # https://optuna.readthedocs.io/en/stable/tutorial/10_key_features/002_configurations.html
    custom_search_space: Optional[str] = None

    # descent: an optuna.pruners.* config (_target_ and its arguments), or None for no pruning; the job
    # reports to it (optuna.trial.Trial.report / should_prune): the sweeper only passes it on
    pruner: Optional[Any] = None

    # descent: set by the sweeper in each job's overrides (hydra.sweeper.trial=<number>): the trial the job
    # runs, which it finds in study_name at storage; None outside a study
    trial: Optional[int] = None

    # descent: keys swept as a grid, in the grid sweeper's syntax (optimizer: sgd,adam; data.batch_size: 16,256):
    # one study per combination, named <study_name>-<value>-<value>, each with n_trials trials of `params`;
    # the jobs get the combination's overrides and hydra.sweeper.study_name. None: one study. Typed Any: an
    # Optional[Dict] None cannot take a dict from the command line (omegaconf's merge fails on it)
    grid: Any = None


# descent: registered as descent_optuna, so that conf/hydra/sweeper/optuna.yaml can list it as its base
ConfigStore.instance().store(
    group="hydra/sweeper",
    name="descent_optuna",
    node=OptunaSweeperConf,
    provider="descent_optuna_sweeper",
)

for name, node in {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "grid": GridSamplerConfig,
    "gp": GPSamplerConfig,
    "qmc": QMCSamplerConfig,
    "protocol": ProtocolSamplerConfig,
}.items():
    ConfigStore.instance().store(
        group="hydra/sweeper/sampler",
        name=name,
        node=node,
        provider="descent_optuna_sweeper",
    )

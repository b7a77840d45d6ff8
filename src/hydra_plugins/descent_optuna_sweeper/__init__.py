# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved
# MIT licence: LICENSE in this folder (Hydra's own, unchanged).
#
# Hydra's Optuna sweeper, ported from facebookresearch/hydra plugins/hydra_optuna_sweeper at commit
# 2c03d1b925fe239e0b67b923699d4027685f198f (plugin version 1.4.0.dev9, optuna >= 4.9), because the released
# hydra-optuna-sweeper (1.2.0, 1.3.0) pins optuna < 3, whose database storage fails on SQLAlchemy 2.
# Replaced by: the first hydra-optuna-sweeper release from that branch (1.4.0) that installs beside
# hydra-core 1.3 with optuna >= 4.9; what descent adds (below) then moves into descent/sweep/driver.py.
#
# Changes from upstream, each marked "descent:" where it is made:
# - config registered as hydra/sweeper/descent_optuna (conf/hydra/sweeper/optuna.yaml sits on top of it);
#   the removed 'motpe' sampler dropped; GridSampler takes a seed; no _target_whitelist_ (Hydra 1.4 only)
# - a pruner (hydra.sweeper.pruner); each job gets its trial as hydra.sweeper.trial=<number>, and a job may
#   finish its own trial (a pruned one); the sweeper then leaves that trial as the job left it
# - a job that returns None or NaN (a diverged or failed run) is a FAIL trial, with that reason
# - range(a,b,s) means what it means to the grid sweeper: b excluded (upstream made it inclusive)
# - a study that goes on (load_if_exists) numbers its jobs after its trials, and seeds its sampler with
#   seed + trials so far (a seeded sampler does not propose the first trials again)
# - a study without a completed trial ends with that said, not `ValueError: No trials are completed yet`

__version__ = "1.4.0.dev9+descent"

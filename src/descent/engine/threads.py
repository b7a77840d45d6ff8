"""How many intra-op threads a run uses, and how OpenMP's idle threads wait (docs/internals/speed.md, "Threads").

Measured on 2 cores (docs/internals/speed.md): torch's default, one thread per core with OpenMP's threads
spinning while they wait, collapses 4-9x as soon as another process holds a core (every parallel op
waits a scheduler slice for the descheduled thread); online SGD is faster on one thread even on a
quiet machine; a batch of 128 gains from a second thread. So:
- GOMP_SPINCOUNT=SPIN_COUNT, in the environment before torch loads libgomp (which reads it once per
  process): an idle thread spins ~10 us, then sleeps. At batch 128 on 2 threads (docs/internals/speed.md):
  libgomp's default spin (300000) is 3.9x slower beside one CPU-bound process, and 10000 or more
  no better; OMP_WAIT_POLICY=PASSIVE (no spin) holds at 1.2x there but wakes a sleeping thread for
  every parallel op, 1.46x the quiet seed run; 1000 keeps the quiet run's speed (1.05x) and 2.1x
  busy. One thread (online SGD) runs no parallel region: any setting is the same there.
  descent/__init__.py calls set_wait_policy(), and every entry point imports descent before torch.
  A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept (libgomp applies GOMP_SPINCOUNT under any
  policy, so none is added beside a user's OMP_WAIT_POLICY).
- threads = the cores granted to this process (affinity, SLURM, Ray, OMP_NUM_THREADS) shared among
  the jobs a local launcher runs at once, and at most one per EXAMPLES_PER_THREAD examples of a batch.
  trainer.threads (an integer) overrides it. torch.set_num_threads works at any time, so each job of a
  sequential sweep gets its own count.
"""

from __future__ import annotations

import logging
import os
import sys

from descent.data.datasets import TABLE, val_examples

# torch is imported inside the functions that need it, never at the top: descent/__init__.py imports this module
# to put GOMP_SPINCOUNT in the environment before torch loads libgomp (which reads it once per process)
SPIN_COUNT = 1000  # idle OpenMP threads spin this long before they sleep (libgomp's default 300000; 0 = PASSIVE)
LIBGOMP_SPIN = 300000  # libgomp's spin when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set
EXAMPLES_PER_THREAD = 64  # a second thread pays from a batch of 128 (2 x 64) here; batch 1 is faster on one
_in_effect: str | None = None  # how libgomp's idle threads wait, as it read the environment (None: not known)
log = logging.getLogger(__name__)


def set_wait_policy() -> None:
    """Put GOMP_SPINCOUNT in the environment if torch has not loaded yet; remember what libgomp reads."""
    global _in_effect
    if _in_effect is not None:
        return
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    # when torch came first, this is still what libgomp read, unless someone changed it in between
    _in_effect = wait_policy(os.environ)


def wait_policy(env=os.environ) -> str:
    """How libgomp's idle threads wait under env: 'spin N' (then sleep), 'PASSIVE', 'ACTIVE', ..."""
    policy, spin = env.get("OMP_WAIT_POLICY"), env.get("GOMP_SPINCOUNT")
    if spin is not None:  # libgomp: GOMP_SPINCOUNT sets the spin under any OMP_WAIT_POLICY
        return f"spin {spin}" if policy is None else f"{policy}, spin {spin}"
    return policy if policy is not None else f"libgomp's default: spin {LIBGOMP_SPIN}"


def _positive_int(text: str | None) -> int | None:
    try:
        n = int(text or "")
    except ValueError:
        return None
    return n if n >= 1 else None


def cpus_granted(env=os.environ) -> int:
    """The cores this process may use: its affinity, and the grants of SLURM, Ray and OMP_NUM_THREADS."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = _positive_int(env.get("SLURM_CPUS_PER_TASK")) or _positive_int(env.get("SLURM_CPUS_ON_NODE"))
    grants = [slurm, _ray_cpus(), _positive_int(env.get("OMP_NUM_THREADS"))]  # OMP_NUM_THREADS: joblib, Ray, a user
    return max(1, min([n] + [g for g in grants if g]))


def _ray_cpus() -> int | None:
    """The CPUs Ray assigned to the task this process runs (none outside a Ray worker)."""
    if "ray" not in sys.modules:  # a Ray worker has imported ray; nobody else needs to pay for it
        return None
    try:
        import ray  # loaded already (checked above): this only names it

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver has no task; an older Ray lacks the call
        return None
    return max(1, int(cpus)) if cpus else None


def jobs_at_once(hydra_cfg) -> int:
    """Jobs a local launcher runs side by side on this machine: hydra's joblib launcher's n_jobs."""
    if hydra_cfg is None or str(hydra_cfg.get("mode")) != "RunMode.MULTIRUN":
        return 1  # a single run: no launcher
    launcher = hydra_cfg.get("launcher")
    if not launcher or not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1  # the basic launcher runs one job at a time; Ray and SLURM grant CPUs per job
    n_jobs = launcher.get("n_jobs") or 1
    if n_jobs < 0:  # joblib: -1 = every core, -2 = all but one, ...
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return int(n_jobs)


def choose(batch_size: int, cpus: int, jobs: int = 1) -> int:
    """Intra-op threads for a run updating on batches of batch_size examples."""
    share = max(1, cpus // max(1, jobs))
    return max(1, min(share, batch_size // EXAMPLES_PER_THREAD))


def batch_size(cfg, n_train: int | None = None) -> int:
    """Examples per update: data.batch_size, or the whole training set for batch gradient descent: n_train,
    the examples the loaded data has (train.py), else the table's for data.name (descent/data/datasets.py)."""
    if cfg.data.get("batch_size"):
        return int(cfg.data.batch_size)
    if n_train is not None:
        return int(n_train)
    facts = TABLE.get(str(cfg.data.get("name")), TABLE["MNIST"])
    val_size = cfg.data.get("val_size") or 0
    val_size = val_examples(val_size, facts.n_train)
    return int(cfg.data.get("limit_train") or facts.n_train - val_size)


def apply(cfg, hydra_cfg=None, n_train: int | None = None) -> int:
    """Set torch's intra-op threads for this run: trainer.threads, or the policy's choice."""
    import torch

    set_wait_policy()
    if cfg.trainer.get("threads"):
        n, why = cfg.trainer.threads, "trainer.threads"
    else:
        batch, cpus, jobs = batch_size(cfg, n_train), cpus_granted(), jobs_at_once(hydra_cfg)
        n, why = choose(batch, cpus, jobs), f"batch {batch}, {cpus} CPUs granted, {jobs} job(s) at once"
    torch.set_num_threads(n)
    log.debug("torch threads: %d (%s); OpenMP wait: %s", n, why, _in_effect)
    return n


def params() -> dict[str, str]:
    """What is in effect, for the run's MLflow params."""
    import torch

    set_wait_policy()
    return {"torch.threads": str(torch.get_num_threads()), "omp.wait_policy": str(_in_effect)}

"""The thread policy (descent/engine/threads.py): its choice from the batch size, the CPUs granted and the jobs run
at once, and OpenMP's spin (GOMP_SPINCOUNT) set before torch loads. A real run's params are checked in tests/test_train.py."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, command
from descent.engine import threads


@pytest.mark.parametrize(
    "batch,cpus,jobs,expected",
    [
        (1, 2, 1, 1),  # online SGD: one thread, even with cores to spare
        (32, 2, 1, 1),
        (128, 2, 1, 2),  # the seed run's mini-batch: both cores when the job has them to itself
        (128, 2, 2, 1),  # ... and one each for two jobs at once
        (128, 16, 1, 2),  # at most one thread per 64 examples of a batch
        (50000, 16, 1, 16),  # full batch: every core granted
        (50000, 16, 3, 5),
        (50000, 2, 10, 1),  # more jobs than cores
    ],
)
def test_the_policy_follows_batch_size_cpus_and_jobs(batch, cpus, jobs, expected):
    assert threads.choose(batch, cpus, jobs) == expected


def test_the_cpus_granted_are_the_fewest_that_affinity_slurm_and_omp_allow():
    mine = len(os.sched_getaffinity(0))
    assert threads.cpus_granted({}) == mine
    assert threads.cpus_granted({"SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "64"}) == 1
    assert threads.cpus_granted({"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert threads.cpus_granted({"SLURM_CPUS_PER_TASK": "64"}) == mine  # a grant beyond the affinity: the affinity
    assert threads.cpus_granted({"OMP_NUM_THREADS": "1"}) == 1  # joblib's and Ray's workers get it set
    assert threads.cpus_granted({"SLURM_CPUS_PER_TASK": "", "OMP_NUM_THREADS": "x"}) == mine


def test_the_affinity_of_the_process_bounds_the_threads():
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from descent.engine import threads; print(threads.cpus_granted({}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def hydra_node(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


def test_the_joblib_launcher_runs_n_jobs_at_once():
    multirun = "hydra.mode=MULTIRUN"
    assert threads.jobs_at_once(hydra_node(multirun)) == 1  # the basic launcher: one job at a time
    assert threads.jobs_at_once(hydra_node(multirun, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")) == 2
    assert (
        threads.jobs_at_once(hydra_node(multirun, "hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"))
        == os.cpu_count()
    )
    assert threads.jobs_at_once(hydra_node(multirun, "hydra/launcher=slurm")) == 1  # SLURM grants CPUs per job
    assert threads.jobs_at_once(hydra_node("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")) == 1  # not a sweep


def test_the_spin_is_set_before_torch_loads_and_a_users_own_wait_is_kept():
    show = (
        "import os; from descent.engine import threads; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), threads._in_effect, sep='|')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda code, env: subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    spin = str(threads.SPIN_COUNT)
    # libgomp itself reports the spin it read when torch loaded it (OMP_DISPLAY_ENV)
    out = run("import descent, torch; torch.ones(2).sum(); " + show, {**env, "OMP_DISPLAY_ENV": "verbose"})
    assert out.stdout.split("\n")[-2] == f"None|{spin}|spin {spin}"
    assert f"GOMP_SPINCOUNT = '{spin}'" in out.stderr
    # a user's own: a policy gets no spin beside it (libgomp would apply GOMP_SPINCOUNT under PASSIVE too)
    assert (
        run("import descent; " + show, {**env, "OMP_WAIT_POLICY": "PASSIVE"}).stdout.strip() == "PASSIVE|None|PASSIVE"
    )
    assert (
        run("import descent; " + show, {**env, "GOMP_SPINCOUNT": "300000"}).stdout.strip() == "None|300000|spin 300000"
    )
    # torch loaded first has read the environment already: left alone, and said to be libgomp's default
    assert run("import torch, descent; " + show, env).stdout.strip() == "None|None|libgomp's default: spin 300000"


def test_train_py_imports_descent_before_torch():
    # the entry point's own imports: torch must load later (in validate), after descent set the wait policy
    code = (
        "import sys; sys.argv = ['train.py']; sys.path.insert(0, 'src'); import os, train; "
        "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", str(threads.SPIN_COUNT)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a second intra-op thread needs a second CPU")
def test_every_intra_op_thread_of_a_run_flushes_subnormals(tmp_path, store):
    """trainer.flush_denormal (on by default) reaches all of torch's threads, not only the one that set it: the
    flag is set before the data's first parallel op starts OpenMP's pool, whose threads copy it when they start.
    tests/subnormals_at_fit.py probes them as a real run's fit starts, at 2 threads."""
    args = [*command("trainer.max_updates=4", "trainer.threads=2", cwd=tmp_path, script="tests/subnormals_at_fit.py")]
    proc = subprocess.run(
        args,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "subnormal results: 0 of 16777216 on 2 threads" in proc.stdout, proc.stdout[-2000:]

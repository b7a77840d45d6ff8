"""A stop at any chunk boundary resumes into the same run with the same result (issues 8, 15, 22).

Each chain runs the entry point as shipped (progress bar on a pseudo-terminal, system metrics, model
logging in the mini-batch chain), stops it at the first chunk, an epoch's last chunk, a middle chunk and
(mini-batch) the run's last chunk (alternating SIGTERM and SIGINT, delivered by tests/stop_at.py at exactly that boundary), continues it
with the command its stop message prints, and compares the result with the same run left alone: the
same metric steps, the same values, the same final weights. The uninterrupted run of each regime is
made once per session and shared.
"""

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, command, output_of, sqlite_store, sweep_of, terminal, train

SMALL = [
    "data.limit_train=1000",
    "data.val_size=200",
    "data.chunk_size=250",
    "trainer.max_epochs=2",
    "trainer.log_every_examples=100",
]
REGIMES = {  # examples per chunk: 250 (online, full batch: 4 chunks per update), 256 (mini: 2 batches)
    # the first chunk, an epoch's last, a middle one; and the run's last in one regime: no training is left
    # after that stop, so nothing of it depends on the regime (suite time)
    "online": (["batching=online", "optimizer=sgd", "optimizer.lr=0.01"], [250, 1000, 1500]),
    "mini": (["batching=mini", "data.chunk_size=256", "optimizer=rmsprop"], [256, 1000, 1512, 2000]),
    "full": (["batching=full", "optimizer=sgd_momentum", "optimizer.lr=0.5"], [250, 1000, 1500]),
}
FIRST = {"online": "SIGTERM", "mini": "SIGINT", "full": "SIGTERM"}
STOP_AT = "tests/stop_at.py"


def stop_at(cwd, store, overrides, env, timeout=300):
    """tests/stop_at.py: the real entry point, stopped by a real signal at a chosen boundary (no terminal)."""
    flags = [o for o in overrides if o.startswith("-")]  # -m goes first
    args = command(*(o for o in overrides if o not in flags), cwd=cwd, script=STOP_AT)
    args[2:2] = flags
    try:  # SIGINT as a terminal hands it over: a suite started in the background (`&` in a script, which
        # ignores SIGINT for its children) would pass the run an ignored SIGINT, and Ctrl-C between jobs is moot
        return subprocess.run(
            args,
            cwd=cwd,
            env={**os.environ, "MLFLOW_TRACKING_URI": store, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"stop_at.py ran past {timeout} s\n{output_of(e)}") from None


def printed_resume(screen: str) -> list[str]:
    """The command a stop message tells the user to type, as an argument list."""
    found = re.findall(r"continue with: (python \S+ resume=\S+)", screen)
    assert found, f"no resume command on the screen:\n{screen[-3000:]}"
    return shlex.split(found[-1])


@pytest.fixture(scope="session")
def reference(tmp_path_factory, mnist_root):
    """regime -> the record of its uninterrupted run, made once. Without model logging (DEVIATIONS), which the
    mini-batch chain keeps: the model is logged after the run's last metric point and its weights are written, so
    nothing compared here depends on it, and the reference is not the run under test."""
    made = {}

    def get(regime):
        if regime not in made:
            cwd = tmp_path_factory.mktemp(f"reference-{regime}")
            store = sqlite_store(cwd)
            train(*SMALL, *REGIMES[regime][0], cwd=cwd, store=store)
            made[regime] = record(store, only_run_id(store), cwd / "outputs" / "run")
        return made[regime]

    return get


def record(store, run_id, out_dir):
    client = MlflowClient(store)
    run = client.get_run(run_id)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    weights = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return run, history, weights


def only_run_id(store):
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    return run.info.run_id


def assert_same(resumed, reference):
    run, history, weights = resumed
    ref_run, ref_history, ref_weights = reference
    assert run.info.status == "FINISHED"
    history = {k: v for k, v in history.items() if not k.startswith("system/")}  # the machine's, not the run's
    ref_history = {k: v for k, v in ref_history.items() if not k.startswith("system/")}
    assert sorted(history) == sorted(ref_history)
    for key in history:
        if key == "progress/seconds":  # wall time: only its steps must match
            assert [s for s, _ in history[key]] == [s for s, _ in ref_history[key]]
            continue
        assert [s for s, _ in history[key]] == [s for s, _ in ref_history[key]], f"{key}: steps differ"
        assert [v for _, v in history[key]] == pytest.approx([v for _, v in ref_history[key]], rel=1e-5), key
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("regime", REGIMES)
def test_a_run_stopped_at_every_kind_of_boundary_resumes_to_the_same_result(tmp_path, reference, regime):
    store = sqlite_store(tmp_path)
    names = [FIRST[regime], "SIGINT" if FIRST[regime] == "SIGTERM" else "SIGTERM"] * 2
    boundaries = REGIMES[regime][1]
    env = {
        "MLFLOW_TRACKING_URI": store,
        "DESCENT_STOP_AT": ",".join(map(str, boundaries)),
        "DESCENT_STOP_SIGNALS": ",".join(names),
    }
    # model logging as shipped in the mini-batch (seed) regime; off in the others (DEVIATIONS: 3-8 s a process)
    args = command(*SMALL, *REGIMES[regime][0], cwd=tmp_path, script=STOP_AT, log_model=regime == "mini")
    run_id = None
    for boundary, name in zip(boundaries, names):
        status, screen = terminal(args, tmp_path, env)
        assert status == 128 + signal.Signals[name], f"stop at {boundary} by {name}:\n{screen[-3000:]}"
        run_id = run_id or only_run_id(store)
        assert MlflowClient(store).get_run(run_id).info.status == "KILLED", boundary
        typed = printed_resume(screen)
        assert typed[1:] == [str(ROOT / "src" / "train.py"), f"resume={run_id}"], typed
        args = [sys.executable, str(ROOT / STOP_AT), *typed[2:]]  # the same command, stopped at the next boundary
    status, screen = terminal([sys.executable, *printed_resume(screen)[1:]], tmp_path, env)  # exactly as printed
    assert status == 0, screen[-3000:]
    assert only_run_id(store) == run_id, "one MLflow run from start to end"
    assert_same(record(store, run_id, tmp_path / "outputs" / "run"), reference(regime))


@pytest.mark.parametrize("stage", ["written", "sent"])
def test_sigkill_while_an_epoch_end_checkpoint_is_written_resumes_to_the_same_result(tmp_path, reference, stage):
    """written: the file is on disk, its metric points not in the store; sent: they are, its upload is not
    done. Resumed from that file, no point is lost and none is written twice. (A SIGKILL after all of it,
    or before the file: tests/test_faults.py's periodic-checkpoint test.)"""
    overrides = SMALL + REGIMES["online"][0]
    store = sqlite_store(tmp_path)
    proc = stop_at(tmp_path, store, overrides, {"DESCENT_KILL_AT": f"{stage}:1000"})
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    run_id = only_run_id(store)
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"  # nobody could mark it
    steps = [m.step for m in MlflowClient(store).get_metric_history(run_id, "val/loss")]
    assert steps == ([] if stage == "written" else [1000]), "the kill landed in the window it names"
    proc = train(f"resume={run_id}", cwd=tmp_path, store=store)
    assert ("metric points of the checkpoint were not in the store" in proc.stdout + proc.stderr) == (
        stage == "written"
    )
    assert_same(record(store, run_id, tmp_path / "outputs" / "run"), reference("online"))


def test_a_checkpoint_for_other_data_is_refused_and_the_run_stays_resumable(tmp_path, mnist_root):
    store = sqlite_store(tmp_path)
    overrides = SMALL + REGIMES["online"][0]
    proc = stop_at(tmp_path, store, overrides, {"DESCENT_STOP_AT": "500", "DESCENT_STOP_SIGNALS": "SIGTERM"})
    assert proc.returncode == 128 + signal.SIGTERM
    run_id = only_run_id(store)
    # another run's checkpoint, on 600 examples, lands in this run's folder
    other = tmp_path / "other"
    other.mkdir()
    stop_at(
        other,
        sqlite_store(other),
        [*overrides, "data.limit_train=600"],
        {"DESCENT_STOP_AT": "500", "DESCENT_STOP_SIGNALS": "SIGTERM"},
    )
    ckpt = tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes((other / "outputs" / "run" / "checkpoints" / "last.ckpt").read_bytes())
    proc = train(f"resume={run_id}", cwd=tmp_path, store=store, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert (
        "was written for other data: n_train 600 in the checkpoint, 1000 now; limit_train 600 in the "
        "checkpoint, 1000 now" in out
    )
    assert "Traceback" not in out
    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"


def test_ctrl_c_between_the_jobs_of_a_sweep_stops_the_sweep_at_once(tmp_path, mnist_root):
    """The job's own handlers (stop at the next chunk) are gone when it ends: Ctrl-C is Ctrl-C again."""
    store = sqlite_store(tmp_path)
    proc = stop_at(
        tmp_path,
        store,
        [
            "-m",
            "seed=0,1,2",
            "data.limit_train=500",
            "trainer.max_epochs=1",
            "logger.log_checkpoint=false",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        {"DESCENT_SIGINT_AFTER_JOB": "0"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), out[-3000:]  # what a shell reports for Ctrl-C
    assert "KeyboardInterrupt" in out
    client, parent, runs = sweep_of(store)
    children = [r for r in runs if r is not parent]
    assert [r.data.params["seed"] for r in children] == ["0"], "job #1 never started"
    assert children[0].info.status == "FINISHED"
    assert parent.info.status == "KILLED"


def test_best_values_are_exact_across_a_stop_and_resume(tmp_path, mnist_root):
    """best/train_loss (no validation data, as the seed run) continues from the best before the stop: its history
    is the staircase of the whole train/loss history, as if the run had never stopped. A resumed run that forgot
    its best would log the first point after the stop as a new best, better or not."""
    from test_record import staircase

    store = sqlite_store(tmp_path)
    overrides = [*SMALL, "data.val_size=0", *REGIMES["mini"][0]]
    env = {"DESCENT_STOP_AT": "1512", "DESCENT_STOP_SIGNALS": "SIGTERM"}
    proc = stop_at(tmp_path, store, overrides, env)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.stdout + proc.stderr)[-3000:]
    run_id = only_run_id(store)
    client = MlflowClient(store)
    before = client.get_metric_history(run_id, "train/loss")
    assert max(m.step for m in before) == 1512
    train(f"resume={run_id}", cwd=tmp_path, store=store)
    history = client.get_metric_history(run_id, "train/loss")
    after = sorted((m for m in history if m.step > 1512), key=lambda m: m.step)
    assert after and after[0].value > min(m.value for m in before), (
        "the first point after the stop is no new best: the case this test is about"
    )
    logged = sorted(client.get_metric_history(run_id, "best/train_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in logged] == staircase(history)
    assert client.get_run(run_id).data.metrics["best/train_loss"] == min(m.value for m in history)

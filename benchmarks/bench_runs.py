"""The benchmark's driver side: the processes that time a job (a worker, Keras, the whole src/train.py), and the
start-up and checkpoint measurements."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_regimes import FIRST_UPDATE, HERE, ROOT, SEED
from bench_report import fmt, verdict
from bench_worker import UNTIMED, Others


def wait_quiet(max_seconds: float, threshold: float = 0.15) -> float:
    """Wait (up to max_seconds) for a second in which other processes use < threshold of the cores."""
    tic = time.perf_counter()
    busy = Others()
    while time.perf_counter() - tic < max_seconds:
        time.sleep(1.0)
        if busy.share() < threshold:
            break
    return time.perf_counter() - tic


def run_checked(args: list[str], env: dict, timeout: float, what: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd: a temporary folder, so that nothing (MLflow's ./mlruns artifacts above all) lands in the project
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_py(data: str, run_dir: Path, *overrides: str) -> list[str]:
    """`python src/train.py` as a user types it, on the data cache `data`, its run folder `run_dir`: the overrides
    after those two."""
    return [sys.executable, str(ROOT / "src" / "train.py"), f"data.root={data}", f"hydra.run.dir={run_dir}", *overrides]


@contextlib.contextmanager
def competitor(busy: bool):
    """One other CPU-bound process beside the busy-* rows' jobs, started before the job, killed after it."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def run_jobs(jobs: list[dict], tmp: Path, env: dict) -> None:
    """Jobs in one worker process; they share its OpenMP wait policy (read once per process) and load."""
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    what = ", ".join(f"{j['regime']}/{j['contender']}" for j in jobs)
    env = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if jobs[0]["wait_policy"]:  # the policy's spin (the worker imports torch before descent could set it)
        env["GOMP_SPINCOUNT"] = jobs[0]["wait_policy"]
    with competitor(jobs[0]["busy"]):
        run_checked([sys.executable, str(HERE / "bench.py"), "--worker", str(spec)], env, 1200, what, tmp)


def run_keras(job: dict, tmp: Path, env: dict) -> None:
    run_checked(
        [
            sys.executable,
            str(HERE / "keras_seed.py"),
            "--data",
            job["data"],
            "--epochs",
            str(job["epochs"]),
            "--limit",
            str(job["limit"] or 0),
            "--seed",
            str(SEED),
            "--budget",
            str(job["budget"]),
            "--out",
            job["result"],
        ],
        {**env, "KERAS_BACKEND": "torch"},
        1200,
        "keras",
        tmp,
    )


def run_whole(job: dict, tmp: Path, env: dict) -> None:
    """`python src/train.py` as a user types it, the job's config on the command line: its epochs timed by its own
    progress/seconds (read back from the run's MLflow history at each epoch's end), as the descent row's clock."""
    import resource

    from mlflow import MlflowClient

    from descent.engine.threads import LIBGOMP_SPIN
    from descent.tracking import names

    run_dir = Path(job["result"]).with_suffix("")
    env = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    two = []
    if job["threads"] != "policy":  # -2t: 2 threads, libgomp's own spin (descent keeps a GOMP_SPINCOUNT it finds)
        env["GOMP_SPINCOUNT"], two = str(LIBGOMP_SPIN), [f"trainer.threads={job['threads']}"]
    args = train_py(
        job["data"],
        run_dir,
        f"optimizer={job['optimizer']}",
        f"batching={job['batching']}",
        f"model={job['model']}",
        f"seed={SEED}",
        f"data.limit_train={job['limit'] or 'null'}",
        f"trainer.max_epochs={job['epochs']}",
        "logger.experiment_name=bench-train.py",
        *UNTIMED,
        *two,
    )
    busy, tic = Others(), time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=tmp,
        env={**env, "MLFLOW_TRACKING_URI": job["store"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = proc.communicate(timeout=1200)[0]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss: the largest child so far (this run, or a worker)
    if proc.returncode != 0:
        sys.exit(f"src/train.py failed ({proc.returncode}):\n{output[-3000:]}")
    wall, share = time.perf_counter() - tic, busy.share()  # share: all but the bench's own process, the run included
    child = (cpu.ru_utime + cpu.ru_stime) - getattr(run_whole, "cpu", 0.0)  # this run's CPU seconds
    run_whole.cpu = cpu.ru_utime + cpu.ru_stime
    client, run_id = MlflowClient(job["store"]), (run_dir / "mlflow_run_id").read_text().strip()
    history = {
        k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
        for k in (names.EPOCH, names.SECONDS, names.UPDATES)
    }
    ends = [0] + sorted(step for step, epoch in history[names.EPOCH].items() if epoch == int(epoch) and epoch > 0)
    at = {k: [history[k].get(step, 0.0) for step in ends] for k in (names.SECONDS, names.UPDATES)}
    others = max(0.0, share - child / wall / os.cpu_count())
    record = client.get_run(run_id).data  # its test accuracy, and the threads and OpenMP wait it reported
    Path(job["result"]).write_text(
        json.dumps(
            {
                "seconds": [b - a for a, b in zip(at[names.SECONDS], at[names.SECONDS][1:])],
                "updates": [int(b - a) for a, b in zip(at[names.UPDATES], at[names.UPDATES][1:])],
                "others": [others] * (len(ends) - 1),
                "peak_rss_mib": cpu.ru_maxrss / 1024,
                "base_rss_mib": float("nan"),
                "test_acc": record.metrics[names.TEST_ACC],
                "threads": int(record.params["torch.threads"]),
                "wait_policy": record.params["omp.wait_policy"],
                # the start-up row of --quick reads these (one train.py process fewer): descent's own log line
                # and the whole command's seconds
                "first_update": float(match.group(1)) if (match := FIRST_UPDATE.search(output)) else None,
                "command_seconds": wall,
            }
        )
    )


def first_update_seconds(runs: int, data: str, tmp: Path, env: dict) -> tuple[list[float], list[float]]:
    """`python src/train.py ...` as a user types it: seconds from process start to the first update, and to exit."""
    firsts, walls = [], []
    run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'startup' / 'mlflow.db'}"}
    (tmp / "startup").mkdir(exist_ok=True)
    for i in range(runs):
        run_dir = tmp / "startup" / f"run{i}"
        args = train_py(
            data,
            run_dir,
            "trainer.max_epochs=1",
            "data.limit_train=1024",
            "trainer.progress_bar=false",
            "logger.log_checkpoint=false",
        )
        tic = time.perf_counter()
        proc = run_checked(args, run_env, 600, "src/train.py", tmp / "startup")
        walls.append(time.perf_counter() - tic)
        text = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
        match = FIRST_UPDATE.search(text)
        if not match:
            sys.exit(f"src/train.py did not log 'first update ... s after the process started':\n{text[-3000:]}")
        firsts.append(float(match.group(1)))
    return firsts, walls


CHECKPOINT_TARGET = 1.03  # the target: the seed run with checkpoints uploaded <= this x the same run without


def checkpoint_costs(rounds: int, data: str, tmp: Path, env: dict, quick: bool) -> list[str]:
    """The seed run through src/train.py (MLflow, checkpoints as shipped) with logger.log_checkpoint true and
    false, on a sqlite store and on a tracking server (descent.services.server, PostgreSQL + MLflow, started here and
    stopped after); training seconds per epoch (the run's progress/seconds), medians over the rounds."""
    from mlflow import MlflowClient

    from descent.services import server

    epochs, limit = (2, 8192) if quick else (3, None)
    state = Path(tempfile.mkdtemp(prefix="descent-bench-server-"))  # PostgreSQL's own user must reach it
    state.chmod(0o755)
    stores = {"sqlite": f"sqlite:///{tmp / 'checkpoints' / 'mlflow.db'}"}
    lines = [
        "| store | log_checkpoint=true, s / epoch | false, s / epoch | x without | target | runs |",
        "|---|---|---|---|---|---|",
    ]
    (tmp / "checkpoints").mkdir(exist_ok=True)
    try:
        print("checkpoints: starting a tracking server", file=sys.stderr, flush=True)
        stores["server"] = server.start(state, free_port())
        for name, uri in stores.items():
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for rnd in range(rounds):
                for upload in (True, False) if rnd % 2 == 0 else (False, True):
                    print(f"checkpoints: {name}, log_checkpoint={upload}", file=sys.stderr, flush=True)
                    run_dir = tmp / "checkpoints" / f"{name}-{upload}-{rnd}"
                    args = train_py(
                        data,
                        run_dir,
                        f"trainer.max_epochs={epochs}",
                        f"data.limit_train={limit or 'null'}",
                        f"logger.log_checkpoint={str(upload).lower()}",
                        "logger.log_model=false",
                        f"logger.experiment_name=bench-checkpoints-{name}",
                    )
                    run_checked(args, {**env, "MLFLOW_TRACKING_URI": uri}, 900, "src/train.py", tmp / "checkpoints")
                    run_id = (run_dir / "mlflow_run_id").read_text().strip()
                    seconds[upload].append(MlflowClient(uri).get_run(run_id).data.metrics["progress/seconds"] / epochs)
            on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
            lines.append(
                f"| {name} | {fmt(on)} | {fmt(off)} | {on / off:.3f} | {verdict(on / off, CHECKPOINT_TARGET, 'without')} "
                f"| {len(seconds[True])} + {len(seconds[False])} |"
            )
    finally:
        server.stop(state)
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    return [
        f"Checkpoints: the seed run{' on 8192 examples' if quick else ''}, {epochs} epochs, through `src/train.py` "
        "(a checkpoint at every epoch end and every 30 s, written and uploaded off the training thread)",
        "",
        *lines,
        "",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

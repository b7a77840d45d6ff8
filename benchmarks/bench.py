"""descent's loop against the plain PyTorch loop and Keras 3, on the MNIST runs of ch. 2 (and on the convnet
and softmax regression).

    make bench                                   # full run: ~10 minutes on 2 cores
    make bench ARGS="--quick --no-keras"         # smoke test: tiny sizes, under a minute
    make bench ARGS="--threads 1 --out FILE"     # the policy rows at one intra-op thread
    make bench ARGS="--only seed,online-sgd,busy-seed,busy-online-sgd"   # the thread policy's rows
    make bench ARGS="--only checkpoints"         # the seed run's checkpoints on sqlite and a tracking server
    make bench ARGS="--only cnn,linear-online --no-keras"   # the other networks against the plain loop

How it measures (the same on every row):
- every (regime, contender) trains in a fresh subprocess on the real MNIST cache: one warm-up epoch
  (the first iterations in a process are several times slower here), then timed epochs; the set runs
  `--rounds` times with the contender order reversed each round, and the table gives medians over
  all timed epochs. --quick runs the torch jobs in one process per wait policy and load instead (faster,
  memory less clean), and reads the start-up row from the seed row's train.py run (one process fewer).
- same model (descent.nets.MLP, or the row's conf/model option; keras init, seed 0), same data order
  (descent.data.epoch_permutation), same hyperparameters (conf/optimizer/*.yaml); flush-denormal on for
  descent and the plain loop.
- descent = src/train.py's own run: descent.pipeline.build(cfg, hc) on the config src/train.py composes from
  conf/ with the shipped defaults (a real MLflow run on a temporary sqlite store, system metrics, checkpoints
  written and uploaded off the training thread, the gradient noise scale at each validation point, the progress
  bar as it is off a terminal; the model is not logged after the test, as UNTIMED says), then pipeline.fit and
  pipeline.finish; its time is the Classifier's own clock
  (train_seconds, the run's progress/seconds: from on_train_epoch_start to the epoch's last update, lightning's
  per-chunk overhead included, validation and measurements excluded). descent-bare: the same build with the noise
  scale, system metrics, checkpoint upload and bar off. train.py (seed row) = the whole `python src/train.py`
  command with the job's overrides, timed by the run's own progress/seconds (read back from MLflow at each
  epoch's end): where it and descent agree, the bench times what users run.
- plain = descent.engine.reference.plain_train with torch's default optimizer (for-loop, not fused, eager).
- with CUDA, gpu-* rows (--no-gpu skips them): descent as configured (trainer.cuda_graphs=auto: one CUDA
  graph replay per update), descent-eager (cuda_graphs=false), plain on the GPU, and bare-graph: a
  captured loop with nothing around it (no lightning, no metrics), the floor for descent's graph path.
  GPU times are taken after torch.cuda.synchronize(); descent's clock stops at its last log point of
  the epoch, which reads the device (a sync).
- peak memory = the process's resident-set high-water mark (VmHWM) over the job, and in brackets its
  growth over the resident set after imports (torch + lightning alone hold ~900 MiB here).
- threads: plain, descent and their variants run at descent's thread policy (descent/engine/threads.py: the
  intra-op threads it chooses for the regime's batch size on this machine, GOMP_SPINCOUNT=1000);
  plain-2t, descent-2t and train.py-2t at 2 intra-op threads with OpenMP's default wait policy (torch's default on
  a 2-core machine, and descent's before the policy); Keras as a user gets it. The table names each row's.
- busy-* rows run the same jobs while one other CPU-bound process (`python -c 'while True: pass'`,
  started before the job and killed after it) holds a core: a parallel sweep, a second user, CI.
- other processes' share of the cores is measured over every timed epoch (/proc/stat); rows where it
  was high are flagged CONTENDED (busy-* rows: beyond their own competitor's core). Before each job the
  run waits a little for the machine to go quiet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench_regimes import ROOT, Row, regimes
from bench_report import STARTUP, contention, machine, overheads, table
from bench_runs import checkpoint_costs, competitor, first_update_seconds, run_jobs, run_keras, run_whole, wait_quiet
from bench_worker import worker


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one worker process: a smoke test (< 60 s)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras 3 contender")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument(
        "--rounds",
        type=int,
        help="repetitions of the whole set, contender order reversed each time (default 2, --quick 1)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        help="seconds in all that the run may spend waiting, before jobs (15 s "
        "at most each), for the other processes on this machine to go quiet (default 60, --quick 0)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads for plain, descent and their variants (default: "
        "descent/engine/threads.py's choice per regime); the -2t rows stay at 2, Keras at torch's default",
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run (default 540, --quick: no limit): "
        "under load, jobs stop after fewer timed epochs (at least one) to stay within it",
    )
    p.add_argument(
        "--only",
        help="comma-separated regimes to run (seed, online-sgd, online-rmsprop, full-batch, "
        "busy-seed, busy-online-sgd, cnn, linear-online, startup, checkpoints, and with CUDA gpu-seed, "
        "gpu-online-sgd, gpu-full-batch); default all",
    )
    p.add_argument("--no-gpu", action="store_true", help="skip the gpu-* rows even where CUDA is available")
    p.add_argument(
        "--data",
        type=lambda d: str(Path(d).resolve()),
        default=str(ROOT / "data"),
        help="MNIST root (IDX files under <data>/MNIST/raw)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    t_start = time.perf_counter()
    started = datetime.datetime.now().astimezone()
    keras = not args.no_keras and _has_keras()
    rounds = args.rounds or (1 if args.quick else 2)
    if args.budget is None:
        args.budget = 0 if args.quick else 540
    max_wait = args.max_wait if args.max_wait is not None else (0 if args.quick else 60)
    waited = 0.0
    only = set(args.only.split(",")) if args.only else None
    gpu = not args.no_gpu and _has_cuda()
    regs = [r for r in regimes(args.quick, keras, gpu) if only is None or r.key in only]
    rows = {(r.key, c): Row(r, c) for r in regs for c in r.contenders}
    info: dict = {}  # what the workers report of the machine (torch, threads, GPU); other work: each row's others' CPU
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH")] if p),
    }
    from descent.engine.threads import SPIN_COUNT  # (importing descent puts it in this process's environment too)

    with tempfile.TemporaryDirectory(prefix="descent-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        schedule = [
            (rnd, reg, name)
            for rnd in range(rounds)
            for reg in regs
            for name in (reg.contenders if rnd % 2 == 0 else reg.contenders[::-1])
        ]
        startup_runs = 0 if only is not None and "startup" not in only else 1 if args.quick else 3
        deadline = time.perf_counter() + args.budget - 20 * startup_runs if args.budget else None
        pending = []
        for i, (rnd, reg, name) in enumerate(schedule):
            if max_wait > waited:
                waited += wait_quiet(min(15.0, max_wait - waited))
            # what is left of the run's budget, shared by the jobs still to come (never below warm-up + 1 epoch)
            budget = max(0.0, (deadline - time.perf_counter()) / (len(schedule) - i)) if deadline else 0.0
            result_path = tmp / f"{reg.key}-{name}-{rnd}.json"
            job = {
                "regime": reg.key,
                "contender": name,
                "model": reg.model,
                "optimizer": reg.optimizer,
                "batching": reg.batching,
                "limit": reg.limit,
                "epochs": reg.epochs,
                "data": args.data,
                "store": store,
                "device": reg.device,
                "budget": budget,
                "result": str(result_path),
                "busy": reg.busy,
                # the thread policy's rows, or torch's threads as they were before it (2 on 2 cores)
                "threads": 2 if name.endswith("-2t") else args.threads or "policy",
                "wait_policy": None if name.endswith("-2t") else str(SPIN_COUNT),
            }
            if name in ("keras", "train.py", "train.py-2t"):  # a process of its own, also with --quick
                print(f"round {rnd + 1}/{rounds}: {reg.key} / {name}", file=sys.stderr, flush=True)
                with competitor(reg.busy):
                    (run_keras if name == "keras" else run_whole)(job, tmp, env)
            elif args.quick:  # the torch jobs in a few processes (one per wait policy and load), after the loop
                pending.append(job)
                continue
            else:  # one process per job: a clean peak-memory reading, no state shared
                print(f"round {rnd + 1}/{rounds}: {reg.key} / {name}", file=sys.stderr, flush=True)
                run_jobs([job], tmp, env)
        groups: dict[tuple, list] = {}  # one process per wait policy and load
        for job in pending:
            groups.setdefault((job["busy"], job["wait_policy"]), []).append(job)
        for group in groups.values():
            print(f"{len(group)} jobs in one process", file=sys.stderr, flush=True)
            run_jobs(group, tmp, env)
        for rnd, reg, name in schedule:
            result = json.loads((tmp / f"{reg.key}-{name}-{rnd}.json").read_text())
            info.update({k: result.pop(k) for k in ("torch", "interop_threads", "keras", "gpu") if k in result})
            rows[reg.key, name].add(result)

        firsts = walls = []
        startup = STARTUP
        whole = rows.get(("seed", "train.py"))
        if args.quick and whole and (only is None or "startup" in only):  # the seed row's train.py run, read again
            firsts, walls = whole.extra["first_update"], whole.extra["command_seconds"]
            if None in firsts:
                sys.exit("src/train.py did not log 'first update ... s after the process started'")
            startup = f"the seed row's train.py run ({whole.regime.limit} examples, {whole.regime.epochs} epochs)"
        elif only is None or "startup" in only:
            print("start-up: src/train.py", file=sys.stderr, flush=True)
            firsts, walls = first_update_seconds(1 if args.quick else 3, args.data, tmp, env)
        checkpoints = []  # --quick (the suite's smoke test) runs them only when asked: a server and 4+ runs
        if (only is None and not args.quick) or (only is not None and "checkpoints" in only):
            checkpoints = checkpoint_costs(rounds, args.data, tmp, env, args.quick)

    command = "python benchmarks/bench.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = [
        f"# descent benchmark, {started:%Y-%m-%d %H:%M %Z}",
        "",
        f"`{command}` — {rounds} round(s), {time.perf_counter() - t_start:.0f} s in all "
        f"({waited:.0f} s of it waiting for other processes to go quiet)",
        "",
        *machine(info),
        "",
        *contention(rows),
        *table(rows, regs),
        "",
        *overheads(rows, firsts, walls, startup),
        *checkpoints,
        "Times: descent = Classifier.train_seconds per epoch in src/train.py's own build (lightning's per-chunk "
        "overhead included; 'lightning wall' = epoch start to epoch start, from a Callback); train.py = the whole "
        "command's progress/seconds between epoch ends; plain = around plain_train(epochs=1); "
        "Keras = a Callback's perf_counter from on_epoch_begin to on_epoch_end. Online rows time a subset and "
        "extrapolate s/epoch to 60000 examples. Medians over timed epochs after one warm-up epoch per process.",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _has_cuda() -> bool:
    import torch  # ~2 s in the driver, which otherwise stays light

    return torch.cuda.is_available()


def _has_keras() -> bool:
    import importlib.util

    return importlib.util.find_spec("keras") is not None


if __name__ == "__main__":
    main()

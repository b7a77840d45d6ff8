"""Shared fixtures: the real MNIST cache, the real entry point in a subprocess, a real sqlite store,
a real tracking server (PostgreSQL + MLflow)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from descent import config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the project's own cache, built from the offline bundle on first use
config.register()  # conf/'s ${descent.*:...} resolvers, as src/train.py registers them: tests compose presets here


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    from descent.data import ensure_data

    ensure_data(DATA, download=False)
    return DATA


_TEMPLATE: list[Path] = []


def sqlite_store(folder: Path) -> str:
    """A sqlite store in `folder` as a user's is after a first run: MLflow's schema created and migrated
    (once per session, then copied: a fresh file costs ~2 s of migrations in every process that opens it).
    test_seed.py and test_terminal.py use brand-new files, as a first run does."""
    if not _TEMPLATE:
        from mlflow import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="descent-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
        _TEMPLATE.append(path)
    shutil.copyfile(_TEMPLATE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def sweep_of(uri: str, experiment: str = "descent"):
    """(client, the experiment's one sweep parent run (tag descent.sweep), all the experiment's runs, the parent
    among them), as MlflowClient reads them: fails unless there is exactly one sweep."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("descent.sweep") == "true"]
    return client, parent, runs


@pytest.fixture
def store(tmp_path) -> str:
    return sqlite_store(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tracking_server_dir():
    """State folder of the session's tracking server; under /tmp, where PostgreSQL's own user can reach it
    (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="descent-tracking-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(tracking_server_dir) -> str:
    """A real PostgreSQL + MLflow tracking server, started as `make server` does (descent.services.server), on a
    free loopback port; yields its http URI and stops both processes at the end of the session."""
    from descent.services import server

    try:
        yield server.start(tracking_server_dir, free_port())
    finally:
        server.stop(tracking_server_dir)


# What the tests' runs change from what a user types, and why. Nothing else differs: the progress bar,
# system metrics, checkpoint uploads and the default store layout are as shipped. Only data size and epochs
# are reduced, test by test.
DEVIATIONS = {
    "data.root": "the project's MNIST cache, built once (the default is data/ under the launch directory, "
    "a fresh temporary folder per test, which would rebuild it every time); not given with "
    "data=digits or data=npz, which have no data.root (ROOTLESS)",
    "logger.log_model": "false: 3-8 s per process; the seed run, the resume chains, test_record and test_ui keep "
    "the default (true)",
    "hydra.run.dir": "outputs under the test's own folder, not the date-stamped default (two runs in one second "
    "would share it)",
    "hydra.sweep.dir": "as hydra.run.dir",
    "MLFLOW_TRACKING_URI": "the test's own store (the default sqlite:///mlflow.db is relative to the launch "
    "directory, which is the test's folder anyway; a server's URI in server tests); "
    "sqlite_store() gives it MLflow's schema already migrated, as after a first run",
}


# a small study's jobs, shared by test_study.py and test_cluster.py: 2 epochs of 2000 examples, logged every 500,
# validated every 1000 on 1000, no checkpoint artifact
SMALL_STUDY = [
    "data.limit_train=2000",
    "data.val_size=1000",
    "trainer.max_epochs=2",
    "trainer.log_every_examples=500",
    "trainer.val_every_examples=1000",
    "logger.log_checkpoint=false",
]
ROOTLESS = ("digits", "npz")  # data options without files under data.root


def command(
    *overrides: str, cwd: Path, script: str = "src/train.py", multirun: bool = False, log_model: bool = False
) -> list[str]:
    """The command line of a test's run: the entry point with DEVIATIONS applied, then the test's overrides."""
    args = [sys.executable, str(ROOT / script)]
    if multirun:
        args.append("-m")
    rootless = any(o in (f"data={option}" for option in ROOTLESS) for o in overrides)
    return args + [
        *([] if rootless else [f"data.root={DATA}"]),
        *([] if log_model else ["logger.log_model=false"]),
        f"hydra.run.dir={cwd}/outputs/run",
        f"hydra.sweep.dir={cwd}/outputs/sweep",
        *overrides,
    ]


def compare(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python src/compare.py <args>` in a subprocess, as typed; keyword arguments go to subprocess.run."""
    return subprocess.run([sys.executable, str(ROOT / "src" / "compare.py"), *args], **kwargs)


def transfer(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m descent.sweep.transfer <args>` in a subprocess, as typed; keyword arguments go to subprocess.run."""
    return subprocess.run([sys.executable, "-m", "descent.sweep.transfer", *args], **kwargs)


def output_of(e: subprocess.TimeoutExpired) -> str:
    text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
    return f"--- stdout\n{text(e.stdout)[-4000:]}\n--- stderr\n{text(e.stderr)[-4000:]}"


def train(
    *overrides: str,
    cwd: Path,
    store: str,
    multirun: bool = False,
    check: bool = True,
    timeout: float = 600,
    env: dict | None = None,
    log_model: bool = False,
) -> subprocess.CompletedProcess:
    """Run src/train.py as a user would (see DEVIATIONS), on the real data cache, writing outputs under cwd."""
    args = command(*overrides, cwd=cwd, multirun=multirun, log_model=log_model)
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": store, **(env or {})}
    try:
        proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"train.py ran past {timeout} s\n{output_of(e)}") from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def train_exits(code: int, *overrides: str, cwd: Path, store: str, **kwargs) -> str:
    """Run src/train.py as train() does, for a run that must exit with `code`; returns all it wrote (stdout, then
    stderr), whose tail the failure shows when the exit status is another."""
    proc = train(*overrides, cwd=cwd, store=store, check=False, **kwargs)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    return out


def start(cwd: Path, store: str, *overrides: str) -> subprocess.Popen:
    """Start src/train.py as train() runs it, without waiting: stdout and stderr on one text pipe, for tests that
    read its lines (wait_for), signal it or stop its store while it trains."""
    return subprocess.Popen(
        command(*overrides, cwd=cwd),
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(proc, text, timeout=120):
    """Lines of a running process's output up to the first that holds `text` (an event, not a sleep)."""
    import time

    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}:\n{''.join(lines)[-3000:]}")


def terminal(
    args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600, columns: int = 120
) -> tuple[int, str]:
    """Run a command on a pseudo-terminal of `columns` x 40, as a user at a terminal would; returns its exit
    status (as subprocess gives it) and everything it wrote to the screen. On a timeout the process is killed
    and the screen so far is in the error."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env={**os.environ, "TERM": "xterm", **(env or {})},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"{' '.join(args)} ran past {timeout} s; its screen:\n"
                    + b"".join(chunks).decode(errors="replace")[-6000:]
                )
            if select.select([master], [], [], min(left, 1.0))[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, mnist_root):
    """A 2-job sweep (sgd, rmsprop) with validation data, the progress bar on and models registered, in
    its own sqlite store: tests/test_record.py reads its record, tests/test_ui.py shows it in a browser.
    Returns (launch dir, store URI, train.py's output)."""
    tmp = tmp_path_factory.mktemp("small_sweep")
    store = sqlite_store(tmp)
    proc = train(
        "optimizer=sgd,rmsprop",
        "data.limit_train=2000",
        "data.val_size=1000",
        "trainer.max_epochs=1",
        "trainer.val_every_examples=500",
        "trainer.progress_bar=true",
        "logger.log_model=true",
        "logger.register_model=mnist-mlp",
        cwd=tmp,
        store=store,
        multirun=True,
        env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    return tmp, store, proc.stdout + proc.stderr


# with CI=true a skipped service or browser test is a failure: CI installs everything they need, so a
# skip there means an install step broke (only the tests marked for CUDA may skip: CI has no GPU)
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not item.get_closest_marker("cuda"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped with CI=true (an install step failed?): {reason}"


class Stop(Exception):
    pass


class StopAfterChunks(pl.Callback):
    """A checkpoint after the k-th chunk, as SafetyCheckpoints writes one on SIGTERM, then a stop."""

    def __init__(self, chunks: int, path):
        self.chunks, self.path, self.seen = chunks, path, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen += 1
        if self.seen == self.chunks:
            trainer.save_checkpoint(self.path, weights_only=False)
            raise Stop


def lightning_fit(
    module, dm, epochs: int, accelerator: str = "cpu", ckpt=None, callbacks=(), max_steps: int = -1, **fit_kw
):
    """The loop in this process under a Lightning Trainer as train.py builds one, without what a unit of the
    loop does not need: no logger, checkpoints, progress bar or Lightning validation (the suite's
    in-process runs of tests/test_graphs.py, test_models.py, test_optimizers.py)."""
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, **fit_kw)
    return module, dm


def plain_fit(net, make_optimizer, dm, *, batch_size: int, epochs: int, seed: int) -> int:
    """The plain PyTorch loop (descent.engine.reference.plain_train) on a DataModule's training tensors, with an
    optimizer made for `net` by `make_optimizer` (a partial composed from conf/): what a fast path must match.
    Returns its number of updates."""
    from descent.engine.reference import plain_train

    optimizer = make_optimizer(net.parameters())
    return plain_train(net, optimizer, dm.x_train, dm.y_train, batch_size=batch_size, epochs=epochs, seed=seed)


def measured_fit(mnist_root, make_net, optimizer, measures):
    """`make_net()` (made after the seed is set) trained with `optimizer` (a partial) on 1500 MNIST examples for 2 epochs, validated (and measured by
    `measures`) every 300 examples; the module and everything the training state holds after it: the weights,
    the optimizer's buffers and the global RNG's next draw (a measurement must leave all of them as they were)."""
    from descent.data import MNISTDataModule
    from descent.engine.loop import Classifier

    pl.seed_everything(0, verbose=False)
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=500, limit_train=1500, batch_size=50, seed=0)
    module = Classifier(make_net(), optimizer=optimizer, val_every_examples=300)
    module.measures += measures
    lightning_fit(module, dm, epochs=2)
    state = [*module.net.parameters(), *(v for s in module.opt.state.values() for v in s.values())]
    return module, [t.detach().clone() for t in state] + [torch.rand(3)]


def regression_at_unit_distance(d: int, seed: int = 0):
    """A linear regression's model y = w·x (no bias) at w = w* + r, |r| = 1, both drawn from `seed`: the net, w*,
    r and the generator (its next draws the examples), for the noise scales' known answers."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(d, 1, bias=False)
    w_star = torch.randn(1, d, generator=g)
    r = torch.randn(1, d, generator=g)
    r /= r.norm()
    with torch.no_grad():
        net.weight.copy_(w_star + r)
    return net, w_star, r, g

"""What `python src/train.py` shows on a terminal: the start line, the examples bar, the closing
block with the run id, and none of the third-party chatter; the same per job of a sweep, then its report.

The entry point runs as shipped (progress bar, model logging, system metrics) on a real pseudo-terminal
(conftest.terminal), reduced in data and epochs only, with an `srun` on PATH as on any machine where
SLURM is installed (Lightning's hint about it is one of the lines a user must not see).
"""

import logging
import os
import re
import stat

from mlflow import MlflowClient

from conftest import command, terminal

# what each of these lines looked like before; none may reach the screen
NOISE = [
    "Creating initial MLflow database tables",
    "Updating database tables",
    "Running upgrade",
    "Skip logging GPU metrics",
    "Started monitoring system metrics",
    "The `srun` command is available",
    "GPU available:",
    "TPU available:",
    "litlogger",
    "_pytree",
    "LeafSpec",
    "Training:",
    "Testing",
    "DataLoader",
    "Epoch 0",
    "it/s]",
    "{'test/loss'",
]
BAR = re.compile(r"epoch 1/1 100%\|█+\| 500/500 \[[0-9:]+<[0-9:]+, \d+ ex/s, loss \d\.\d{4}, acc \d+\.\d{2}%\]")
CLOSING = re.compile(
    r"test/loss \d\.\d{4}, test/acc \d+\.\d{2}% after 500 examples, 4 updates, [0-9.]+ s of training\r?\n"
    r"MLflow run ([0-9a-f]{32}) \((\w+-mini-s0), experiment descent\)\r?\n"
    r"to look at it: make ui, then open http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/\1"
)


def run_on_terminal(tmp_path, *overrides, multirun=False):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(stat.S_IRWXU)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, screen = terminal(
        command(
            "data.limit_train=500", "trainer.max_epochs=1", *overrides, cwd=tmp_path, multirun=multirun, log_model=True
        ),
        cwd=tmp_path,
        timeout=300,
        env={"MLFLOW_TRACKING_URI": store, "PATH": f"{fake}:{os.environ['PATH']}"},
    )
    assert code == 0, screen[-4000:]
    return MlflowClient(store), screen


def lines(screen: str) -> list[str]:
    """The screen's lines as a user sees them: a redrawn bar counts once, as its last state."""
    return [line.rsplit("\r", 1)[-1] for line in screen.replace("\r\n", "\n").split("\n") if line.strip("\r")]


def test_a_run_shows_what_runs_the_bar_and_where_to_look(tmp_path, mnist_root):
    client, screen = run_on_terminal(tmp_path)
    assert [n for n in NOISE if n in screen] == [], screen
    assert (
        "rmsprop-mini-s0 (data=mnist model=mlp optimizer=rmsprop batching=mini): 500 train, 10000 test "
        "examples; cpu, " in screen
    )
    assert "MLflow sqlite:///" in screen and "output outputs/run\r\n" in screen
    assert "\repoch 1/1 " in screen  # drawn live: redrawn in place
    assert BAR.search(screen), screen
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    found = CLOSING.search(screen)
    assert found and found.group(1) == run.info.run_id and found.group(3) == run.info.experiment_id, screen
    assert f"test/acc {100 * run.data.metrics['test/acc']:.2f}%" in screen
    assert len(lines(screen)) <= 15, lines(screen)
    # the run's log file keeps what the screen leaves out
    log = (tmp_path / "outputs" / "run" / "train.log").read_text()
    for line in (
        "Creating initial MLflow database tables",
        "GPU available: False",
        "The `srun` command is available",
        "MNIST from cache",
        "model logged in",
    ):
        assert line in log, line


def test_a_sweep_shows_each_job_then_the_report(tmp_path, mnist_root):
    client, screen = run_on_terminal(tmp_path, "optimizer=sgd,rmsprop", multirun=True)
    assert [n for n in NOISE if n in screen] == [], screen
    runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name("descent").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    closings = list(CLOSING.finditer(screen))
    assert [(m.group(1), m.group(2)) for m in closings] == [
        (r.info.run_id, r.info.run_name) for r in sorted(runs, key=lambda r: r.info.start_time)
    ]
    assert len(BAR.findall(screen)) == 2 and screen.count("-mini-s0 (data=mnist model=mlp optimizer=") == 2
    assert "| configuration |" in screen and "| sgd-mini | 1 | ok |" in screen and "| rmsprop-mini | 1 | ok |" in screen
    assert "convergence report: outputs/sweep/convergence.md (table)" in screen
    parent = runs[0].data.tags["mlflow.parentRunId"]
    assert f"the sweep's MLflow run {parent}; to look at it: make ui, then open " in screen


def test_the_screen_filter_drops_only_known_chatter_unless_verbose():
    from descent.console.terminal import Quiet

    def record(name, level, message):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    quiet, root = Quiet(), logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert not quiet.filter(
            record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables...")
        )
        assert quiet.filter(
            record("mlflow.store.db.utils", logging.WARNING, "Creating a store failed")
        )  # another message
        assert quiet.filter(
            record("pytorch_lightning.utilities.rank_zero", logging.ERROR, "GPU available: no")
        )  # errors
        assert not quiet.filter(record("descent.data", logging.DEBUG, "MNIST from cache"))  # details: log file only
        root.setLevel(logging.DEBUG)  # hydra.verbose=true
        assert quiet.filter(record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables..."))
        assert quiet.filter(record("descent.data", logging.DEBUG, "MNIST from cache"))
    finally:
        root.setLevel(level)


def test_a_terminal_of_0_columns_gets_log_lines():
    import fcntl
    import pty
    import struct
    import termios

    from descent.console.progress import terminal_columns

    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            for columns, expected in ((120, 120), (0, 0)):  # `stty cols 0`: no bar to draw in
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
                env = os.environ.pop("COLUMNS", None)
                try:
                    assert terminal_columns(tty) == expected
                finally:
                    if env is not None:
                        os.environ["COLUMNS"] = env
    finally:
        os.close(master)
        os.close(slave)

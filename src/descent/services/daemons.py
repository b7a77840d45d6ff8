"""What the services (the tracking server, the Ray and SLURM clusters) share: installing what they need, daemons
as process groups of their own whose pids are kept in a state folder, ports on 127.0.0.1, waiting for them."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from descent.services import debian

ROOT = Path(__file__).resolve().parents[3]  # the project: its pyproject.toml names the extras
START_TIMEOUT = 120  # s, for a cluster to answer after its daemons were started


class ServiceError(RuntimeError):
    """A service that cannot be installed, started or reached; the commands print it and exit 1."""


# ---------------------------------------------------------------------------------------------
# installing


def ensure_extra(extra: str, module: str) -> None:
    """pyproject.toml's optional extra, into this interpreter, when `module` does not import."""
    if importlib.util.find_spec(module) is not None:
        return
    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    print(f"installing the {extra} extra: {' '.join(reqs)}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *reqs], check=True
    )


def ensure_apt(packages: list[str], missing: str) -> None:
    """Debian's packages (apt-get, as root); `missing` says what was not found, in the error without root."""
    if os.geteuid() == 0:
        print(f"installing {' '.join(packages)} (apt-get)", flush=True)
    try:
        debian.install(packages)
    except debian.DebianError as e:
        raise ServiceError(f"{missing}; {e}") from e


# ---------------------------------------------------------------------------------------------
# ports, daemons, state files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def spawn(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> int:
    """A daemon in the foreground of its own session (so stop can end it and its children as one group)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return proc.pid


def alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that ended (the tests' fixture)
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def kill_group(pid: int, timeout: float = 20) -> None:
    """SIGTERM to a daemon's process group, SIGKILL to what is left after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if we are its parent (the tests' fixture)
            except ChildProcessError:
                pass
            time.sleep(0.1)


def read_state(dir: Path) -> dict:
    path = dir / "cluster.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(dir: Path, state: dict) -> None:
    (dir / "cluster.json").write_text(json.dumps(state, indent=1))


def running(state: dict) -> bool:
    return bool(state.get("pids")) and all(alive(pid) for pid in state["pids"].values())


def stop_all(dir: Path, grace: float = 20) -> None:
    state = read_state(dir)
    for pid in reversed(list(state.get("pids", {}).values())):  # in reverse order of starting
        kill_group(pid, timeout=grace)
    state.pop("pids", None)
    if state:
        write_state(dir, state)


def wait_for(ready, what: str, logs: list[Path], pids: dict) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        dead = [name for name, pid in pids.items() if not alive(pid)]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-1500:]}" for log in logs if log.is_file())
            why = f"{', '.join(dead)} exited" if dead else f"no answer within {START_TIMEOUT} s"
            raise ServiceError(f"{what} did not come up ({why}):\n{tails}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# the commands (python -m descent.services.server|cluster ...)


def show_status(state: dict, up: bool) -> int:
    """`status`: one `key: value` line each; exit 0 when it runs, 3 when it does not (as LSB's init scripts)."""
    for key, value in state.items():
        print(f"{key}: {value}")
    return 0 if up else 3


def run_command(command) -> int:
    """A service's command: its exit status, or a ServiceError said in one line, exit 1."""
    try:
        return command() or 0
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

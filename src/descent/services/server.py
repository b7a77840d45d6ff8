"""The team's tracking server: PostgreSQL + `mlflow server` on this machine, without systemd.

    python -m descent.services.server start [--dir outputs/tracking] [--port 5000]   # idempotent
    python -m descent.services.server status | stop

Everything lives under one folder (default outputs/tracking/): postgres/ (the cluster's data, its
socket too: PostgreSQL listens on no TCP port, only MLflow talks to it), artifacts/ (what runs upload,
served by MLflow's proxy), logs, pid file and server.json (the port it was started on). Data survive a
stop/start. MLflow binds 127.0.0.1 only. The make targets and the tests' `tracking_server` fixture
both come here, so what a user starts is what the tests prove.

Starting installs what is missing: Debian's `postgresql` (apt, as root) and the `server` extra of
pyproject.toml (psycopg2). PostgreSQL refuses to run as root, so as root the cluster runs as the
`postgres` user that the Debian package creates.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

from descent.services.daemons import (
    ServiceError,
    alive,
    ensure_apt,
    ensure_extra,
    kill_group,
    run_command,
    show_status,
    spawn,
)
from descent.tracking.store import reachable

DEFAULT_DIR = Path("outputs/tracking")
DEFAULT_PORT = 5000
PG_PORT = 5432  # only names the socket file inside postgres/; no TCP port is opened
DATABASE = USER = "mlflow"
STUDIES = "optuna"  # a second database, for Optuna studies (hydra/sweeper=optuna): its tables beside MLflow's
# would clash (both keep an alembic_version table)
WORKERS = 2  # uvicorn workers; each is a ~0.3 GB python process
START_TIMEOUT = 180  # s; the first start creates MLflow's schema in PostgreSQL


class ServerError(ServiceError):
    pass


# ---------------------------------------------------------------------------------------------
# what it needs


def pg_bin(name: str) -> str:
    """A PostgreSQL program: Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    for d in reversed(versions):
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"PostgreSQL's {name} was not found")


def ensure_postgresql() -> None:
    try:
        pg_bin("initdb")
        return
    except ServerError:
        pass
    ensure_apt(["postgresql"], "PostgreSQL is not installed")
    pg_bin("initdb")


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _as_pg_user() -> dict:
    """subprocess kwargs that run a PostgreSQL program as a non-root user (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("no `postgres` user to run PostgreSQL as (Debian's postgresql package creates it)") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": {**os.environ, "HOME": pw.pw_dir}}


def _pg(dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, cwd=dir, **_as_pg_user())
    if check and proc.returncode != 0:
        raise ServerError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\nlog: {dir / 'postgres.log'}"
        )
    return proc


def backend_uri(dir: Path, database: str = DATABASE) -> str:
    # psycopg2 named explicitly: a bare postgresql:// makes SQLAlchemy 2.1 look for psycopg 3
    return f"postgresql+psycopg2://{USER}@/{database}?host={Path(dir).resolve() / 'postgres'}&port={PG_PORT}"


def study_storage(dir: str | Path = DEFAULT_DIR) -> str:
    """The URL of the cluster's database for Optuna studies: hydra.sweeper.storage=<this> (through the socket,
    so the jobs of a study must run on this machine; Ray or SLURM nodes elsewhere need a TCP database)."""
    return backend_uri(Path(dir), STUDIES)


def pg_running(dir: Path) -> bool:
    data = dir / "postgres"
    return (data / "PG_VERSION").is_file() and _pg(
        dir, pg_bin("pg_ctl"), "status", "-D", str(data), check=False
    ).returncode == 0


def start_postgres(dir: Path) -> None:
    data, log = (dir / "postgres").resolve(), (dir / "postgres.log").resolve()
    owner = _as_pg_user()
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        log.touch()
        if owner:
            for p in (data, log):
                os.chown(p, owner["user"], owner["group"])
        data.chmod(0o700)
        _pg(dir, pg_bin("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions")
    if not pg_running(dir):
        if len(str(data / f".s.PGSQL.{PG_PORT}")) > 100:
            raise ServerError(f"{data} is too long a path for PostgreSQL's socket; choose a shorter --dir")
        # the socket in the data folder (only its owner and root can enter it), no TCP at all
        opts = f"-c listen_addresses='' -c unix_socket_directories='{data}' -c port={PG_PORT}"
        _pg(dir, pg_bin("pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts)
    for database in (DATABASE, STUDIES):
        exists = _pg(
            dir,
            pg_bin("psql"),
            "-h",
            str(data),
            "-p",
            str(PG_PORT),
            "-U",
            USER,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
        ).stdout.strip()
        if exists != "1":
            _pg(dir, pg_bin("createdb"), "-h", str(data), "-p", str(PG_PORT), "-U", USER, database)


def stop_postgres(dir: Path) -> None:
    if pg_running(dir):
        _pg(dir, pg_bin("pg_ctl"), "stop", "-D", str((dir / "postgres").resolve()), "-m", "fast", "-w", "-t", "60")


# ---------------------------------------------------------------------------------------------
# MLflow


def _state(dir: Path) -> dict:
    path = dir / "server.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tracking_uri(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def mlflow_pid(dir: Path) -> int | None:
    """The running MLflow server's pid (the leader of its process group), or None."""
    path = dir / "mlflow.pid"
    if not path.is_file():
        return None
    pid = int(path.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    # a pid reused by another program after a reboot is not ours
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file() and b"mlflow" not in cmdline.read_bytes():
        return None
    return pid


def start_mlflow(dir: Path, port: int, workers: int = WORKERS) -> str:
    uri = tracking_uri(port)
    if mlflow_pid(dir) is not None:
        if _state(dir).get("port") != port:
            raise ServerError(f"an MLflow server from {dir} already runs on port {_state(dir).get('port')}")
        return uri
    if reachable(uri, timeout=1):
        raise ServerError(f"port {port} already answers as an MLflow server that is not {dir}'s; use --port")
    artifacts = (dir / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend_uri(dir),
        "--artifacts-destination",
        str(artifacts),
    ]
    # without the job-execution workers: with them the server takes ~2.8 GB of RAM
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    pid = spawn(cmd, dir / "mlflow.log", env=env, cwd=dir)  # its own session: stop() ends it and its workers
    (dir / "mlflow.pid").write_text(str(pid))
    (dir / "server.json").write_text(json.dumps({"port": port, "uri": uri}))
    deadline = time.monotonic() + START_TIMEOUT
    while not reachable(uri):
        if not alive(pid) or time.monotonic() > deadline:
            kill_group(pid)
            tail = (dir / "mlflow.log").read_text(errors="replace")[-3000:]
            raise ServerError(f"the MLflow server did not come up on {uri}; {dir / 'mlflow.log'} ends with:\n{tail}")
        time.sleep(0.5)
    return uri


def stop_mlflow(dir: Path) -> None:
    pid = mlflow_pid(dir)
    if pid is not None:
        kill_group(pid)
    (dir / "mlflow.pid").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the commands


def start(dir: str | Path = DEFAULT_DIR, port: int | None = None, workers: int = WORKERS) -> str:
    """Start what is not running (PostgreSQL, then MLflow); returns the tracking URI."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    port = port or _state(dir).get("port") or DEFAULT_PORT
    ensure_postgresql()
    ensure_extra("server", "psycopg2")
    start_postgres(dir)
    return start_mlflow(dir, port, workers)


def stop(dir: str | Path = DEFAULT_DIR) -> None:
    dir = Path(dir).resolve()
    stop_mlflow(dir)
    stop_postgres(dir)


def status(dir: str | Path = DEFAULT_DIR) -> dict:
    dir = Path(dir).resolve()
    port = _state(dir).get("port")
    pid = mlflow_pid(dir)
    return {
        "postgresql": "running" if pg_running(dir) else "stopped",
        "mlflow": f"running (pid {pid})" if pid else "stopped",
        "uri": tracking_uri(port) if pid and port else None,
        "healthy": bool(pid and port and reachable(tracking_uri(port))),
        "studies": study_storage(dir) if pg_running(dir) else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m descent.services.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--dir",
        default=os.environ.get("DESCENT_TRACKING_DIR", str(DEFAULT_DIR)),
        help="state folder: database, artifacts, logs (default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"MLflow's port on 127.0.0.1 (default: the last one used, else {DEFAULT_PORT})",
    )
    parser.add_argument("--workers", type=int, default=WORKERS, help="MLflow server worker processes")
    args = parser.parse_args(argv)

    def command() -> int | None:
        if args.command == "start":
            already = mlflow_pid(Path(args.dir)) is not None
            uri = start(args.dir, args.port, args.workers)
            print(
                f"MLflow tracking server {'already running' if already else 'started'} at {uri} "
                f"(PostgreSQL and artifacts in {Path(args.dir).resolve()})"
            )
            print(f"export MLFLOW_TRACKING_URI={uri}")
            print(f"Optuna studies in its PostgreSQL: \"hydra.sweeper.storage='{study_storage(args.dir)}'\"")
        elif args.command == "stop":
            stop(args.dir)
            print(f"stopped the tracking server of {Path(args.dir).resolve()}")
        else:
            state = status(args.dir)
            return show_status(state, state["healthy"])

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())

"""Single-node Ray and SLURM clusters on this machine, for `hydra/launcher=ray|slurm`, without systemd.

    python -m descent.services.cluster ray start|stop|status [--dir outputs/ray] [--port 6379]
    python -m descent.services.cluster slurm start|stop|status [--dir outputs/slurm]

Ray: a head node plus one worker node (two raylets, as on a real cluster), 1 CPU each, on 127.0.0.1 only
(Ray's loopback mode, see LOOPBACK below; hydra/launcher=ray puts its driver in it, RayLoopback below; other
drivers, `ray status` or a script, need the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that `start` prints).
SLURM: Debian's munged, slurmctld and slurmd as root, one node `localhost`, partition `debug`; sbatch and
squeue find it through the SLURM_CONF that `start` prints. Every daemon is a child in its own session
whose pid is kept in the state folder; stop ends those process groups and nothing else. The make
targets and the tests' fixtures both come here, so what a user starts is what the tests prove.

Starting installs what is missing: the `ray` or `slurm` extra of pyproject.toml (pip), and for SLURM
Debian's slurm-wlm and munge (apt, as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from descent.services import debian
from descent.services.server import kill_group

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120  # s, for a cluster to answer after its daemons were started


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# shared by both: installing, daemons as process groups, state files

def ensure_extra(extra: str, module: str) -> None:
    """pyproject.toml's optional extra, into this interpreter, when `module` does not import."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return
    import tomllib

    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    print(f"installing the {extra} extra: {' '.join(reqs)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *reqs],
                   check=True)


def ensure_apt(programs: list[str], packages: list[str]) -> None:
    if all(shutil.which(p) for p in programs):
        return
    if os.geteuid() == 0:
        print(f"installing {' '.join(packages)} (apt-get)", flush=True)
    try:
        debian.install(packages)
    except debian.DebianError as e:
        raise ClusterError(f"{', '.join(programs)} not found; {e}") from e


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
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
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
            raise ClusterError(f"{what} did not come up ({why}):\n{tails}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Ray

# Ray on loopback only. Ray's C++ servers (GCS, raylet and its object manager, every worker's gRPC server) and its
# agents listen on 127.0.0.1 exactly when their node's IP address is the string "127.0.0.1", and on 0.0.0.0
# otherwise (GrpcServer's listen_to_localhost_only). But `ray start --node-ip-address=127.0.0.1` and an address
# 127.0.0.1:PORT are rewritten by services.resolve_ip_for_localhost to the host's address (the source address of
# a route to 8.8.8.8, 192.0.2.2 here), unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: then get_node_ip_address is
# 127.0.0.1 in every Ray process (its mode for laptops, ray_constants.ENABLE_RAY_CLUSTER). Every process of the
# cluster and every driver gets that variable (env(), which `start` prints). Two more things, which RAY_START
# (`ray start` in a wrapper) lifts and nothing else:
# - the mode's one refusal is `ray start --address` (a worker node, scripts.py: "Multi-node Ray clusters are not
#   supported on Windows and OSX"), a check in the CLI alone; nodes on one host sharing one IP address is what
#   Ray's own multi-node tests (cluster_utils) do;
# - the head's dashboard process runs even with --include-dashboard=false (only UsageStatsHead then), and that
#   module asks the clouds' metadata servers (169.254.169.254, metadata.google.internal) who hosts it, usage
#   stats disabled or not (usage_lib.get_cluster_config_to_report): the head starts no dashboard process.
#   `ray status`, jobs as Ray tasks and the Hydra launcher do not need it (Ray's job and state APIs would).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class RayLoopback(Callback):
    """hydra/launcher=ray in the driver (conf/hydra/launcher/ray.yaml adds it to the sweep's callbacks).

    A cluster at a loopback address is one in Ray's loopback mode (`make ray`), which the driver must share,
    or ray.init rewrites 127.0.0.1 to the host's address and retries "Failed to connect to GCS" there for
    minutes. Ray reads the variable when it is imported, and the launcher imports it when it launches, after
    this callback: setting it here is in time (a Hydra job's env_set would reach only the jobs). No cluster
    at that address: the sweep stops at once, before its parent run exists, saying how to start one.
    Another address is a real cluster: left to Ray.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        address = str(OmegaConf.select(config, "hydra.launcher.ray.init.address") or "")
        host, _, port = address.rpartition(":")
        if host not in ("127.0.0.1", "localhost") or not port.isdigit():
            return
        if not port_open(int(port)):
            print(f"hydra/launcher=ray: no Ray cluster answers at {address} (hydra.launcher.ray.init.address, "
                  f"from RAY_ADDRESS); start one with `make ray`, or export RAY_ADDRESS=<host:port> of yours",
                  file=sys.stderr)
            sys.exit(2)
        [(key, value)] = LOOPBACK.items()
        os.environ.setdefault(key, value)  # a value of the user's own wins
        if "ray._private.ray_constants" in sys.modules:  # imported already (not by the launcher): tell it too
            sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = os.environ[key].lower() in ("1", "true")

RAY_START = """\
import sys, types
import ray._private.ray_constants as constants
import ray._private.services as services
import ray.scripts.scripts as scripts
# the CLI's own view of the constants allows a worker node; services.py keeps the real (loopback) one
scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), "ENABLE_RAY_CLUSTER": True})
services.start_api_server = lambda *args, **kwargs: (None, None)  # no dashboard process (node.py allows None)
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""


class Ray:
    """A head (GCS on `port`) and `workers` more nodes on 127.0.0.1 only, each a `ray start --block`."""

    default_dir, default_port = Path("outputs/ray"), 6379

    def __init__(self, dir: str | Path = default_dir, port: int | None = None, workers: int = 1,
                 cpus_per_node: int = 1, object_store_mb: int = 100):
        self.dir = Path(dir).resolve()
        self.port = port or read_state(self.dir).get("port") or self.default_port
        self.workers, self.cpus, self.store_mb = workers, cpus_per_node, object_store_mb

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, **LOOPBACK}  # without LOOPBACK a driver dials 192.0.2.2:PORT

    def ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def nodes_alive(self) -> int:
        out = subprocess.run([self.ray(), "status", f"--address={self.address}"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **LOOPBACK}).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    @staticmethod
    def node_up(log: Path) -> bool:
        # `ray start --block` says so once its node has joined the cluster (cheaper than `ray status`)
        return log.is_file() and "block forever" in log.read_text(errors="replace")

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if running(read_state(self.dir)):
            return self.address
        if port_open(self.port):
            raise ClusterError(f"port {self.port} is taken (another Ray head?); choose another with --port")
        ensure_extra("ray", "hydra_plugins.hydra_ray_launcher")
        # Ray's sockets live in its temp dir, and a unix socket path has at most 107 bytes: keep it short
        tmp = Path(f"/tmp/descent-ray-{self.port}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK}
        env.pop("RAY_ADDRESS", None)

        def node_args() -> list[str]:  # per node: fixed default ports that two nodes on one machine would share
            return [f"--num-cpus={self.cpus}", "--num-gpus=0", f"--object-store-memory={self.store_mb * 2**20}",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block",
                    f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

        state = {"address": self.address, "port": self.port, "temp_dir": str(tmp), "pids": {}}
        head = [sys.executable, "-c", RAY_START, "start", "--head", f"--port={self.port}", f"--temp-dir={tmp}",
                "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *node_args()]
        logs = [self.dir / "head.log"] + [self.dir / f"worker{i}.log" for i in range(self.workers)]
        for log in logs:
            log.unlink(missing_ok=True)
        # the nodes' jobs start in this folder (Ray's workers inherit it): started from the project folder,
        # as the make target does, relative paths (data/, outputs/) mean there what they mean to the driver
        state["pids"]["head"] = spawn(head, logs[0], env=env)
        write_state(self.dir, state)
        try:
            wait_for(lambda: self.node_up(logs[0]), f"the Ray head on {self.address}", logs, state["pids"])
            for i in range(self.workers):
                worker = [sys.executable, "-c", RAY_START, "start", f"--address={self.address}", *node_args()]
                state["pids"][f"worker{i}"] = spawn(worker, logs[i + 1], env=env)
                write_state(self.dir, state)
            wait_for(lambda: all(self.node_up(log) for log in logs), f"{1 + self.workers} Ray nodes", logs,
                     state["pids"])
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        # a Ray node keeps nothing worth a clean shutdown (its temp dir goes next), and part of the head's
        # process group outlives SIGTERM: SIGKILL after 3 s, not the 20 s the stateful daemons get
        # (measured: the head's group took 22 s to stop, the 20 s grace and the SIGKILL after it)
        stop_all(self.dir, grace=3)
        tmp = read_state(self.dir).get("temp_dir")
        if tmp and Path(tmp).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)

    def status(self) -> dict:
        state = read_state(self.dir)
        up = running(state)
        return {"ray": "running" if up else "stopped", "address": self.address if up else None,
                "nodes": self.nodes_alive() if up else 0, **{f"pid.{k}": v for k, v in state.get("pids", {}).items()}}


# ---------------------------------------------------------------------------------------------
# SLURM

SLURM_CONF = """\
# written by python -m descent.services.cluster slurm start: a one-node cluster on 127.0.0.1, no systemd, no cgroups
ClusterName=descent
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
# bind the daemons to their own addresses above (127.0.0.1), not to every interface
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# containers and machines without systemd: no cgroup plugins (and no cgroup.conf)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct has nothing to say, squeue and scontrol do
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=10
DefMemPerCPU=1024         # MB, for a job that asks for no memory (else it would take the whole node)
MinJobAge=3600            # finished jobs stay in slurmctld's memory for an hour: what bin/sacct reads
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


# submitit follows its jobs with `sacct -o JobID,State,NodeList --parsable2 -j ID...`; without slurmdbd sacct
# has nothing, and a job that died before writing its result would be waited for forever. This sacct
# answers that question from slurmctld's memory (squeue -t all); `start` puts it first on the PATH it prints.
SACCT = """\
#!/bin/sh
# written by python -m descent.services.cluster slurm start: sacct for a cluster without slurmdbd (see cluster.py)
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids="$ids${ids:+,}$2"; shift 2 ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
exec squeue -h -t all ${ids:+-j "$ids"} -o "%i|%T|%N"
"""


class Slurm:
    """munged, slurmctld and slurmd (one node, `localhost`) with their config and state under `dir`."""

    default_dir = Path("outputs/slurm")

    def __init__(self, dir: str | Path = default_dir, ctld_port: int | None = None, slurmd_port: int | None = None):
        self.dir = Path(dir).resolve()
        state = read_state(self.dir)
        self.ctld_port = ctld_port or state.get("ctld_port") or 6817
        self.slurmd_port = slurmd_port or state.get("slurmd_port") or 6818
        self.conf = self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}"}

    def node_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **self.env()})
        return out.stdout.strip() if out.returncode == 0 else ""

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if running(read_state(self.dir)):
            return str(self.conf)
        if os.geteuid() != 0:
            raise ClusterError("the single-node SLURM runs its daemons as root: run this as root")
        for port in (self.ctld_port, self.slurmd_port):
            if port_open(port):
                raise ClusterError(f"port {port} is taken (another SLURM?); choose others with --ports")
        ensure_apt(["slurmctld", "slurmd", "munged", "sbatch"], ["slurm-wlm", "munge"])
        ensure_extra("slurm", "hydra_plugins.hydra_submitit_launcher")
        for sub in ("munge", "ctld", "spool", "bin"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "bin" / "sacct").write_text(SACCT)
        (self.dir / "bin" / "sacct").chmod(0o755)
        munge = self.dir / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        if not key.is_file():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], ctld_port=self.ctld_port, slurmd_port=self.slurmd_port,
            dir=self.dir, cpus=os.cpu_count(), mem_mb=mem_mb * 3 // 4))  # a quarter left to the rest
        env = {**os.environ, **self.env()}
        state = {"conf": str(self.conf), "ctld_port": self.ctld_port, "slurmd_port": self.slurmd_port, "pids": {}}
        logs = [munge / "munged.log", self.dir / "slurmctld.log", self.dir / "slurmd.log"]
        daemons = {
            "munged": ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
                       f"--pid-file={munge}/munged.pid", f"--log-file={logs[0]}", f"--seed-file={munge}/munged.seed"],
            "slurmctld": ["slurmctld", "-D", "-i", "-f", str(self.conf)],  # -i: start even on damaged saved state
            "slurmd": ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)],
        }
        try:
            for name, args in daemons.items():
                state["pids"][name] = spawn(args, self.dir / f"{name}.out", env=env, cwd=self.dir)
                write_state(self.dir, state)
                if name == "munged":
                    wait_for(lambda: (munge / "munge.socket").exists(), "munged", logs, state["pids"])
            wait_for(lambda: self.node_state() == "idle", "the SLURM node (sinfo: idle)",
                     logs + [self.dir / f"{n}.out" for n in daemons], state["pids"])
        except BaseException:
            self.stop()
            raise
        return str(self.conf)

    def stop(self) -> None:
        stop_all(self.dir)

    def status(self) -> dict:
        state = read_state(self.dir)
        up = running(state)
        return {"slurm": "running" if up else "stopped", "SLURM_CONF": str(self.conf) if up else None,
                "node": self.node_state() if up else None,
                **{f"pid.{k}": v for k, v in state.get("pids", {}).items()}}


# ---------------------------------------------------------------------------------------------
# the commands

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m descent.services.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=("ray", "slurm"))
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", help="state folder: config, logs, pids (default outputs/<engine>)")
    parser.add_argument("--port", type=int, help="ray: the head's GCS port (default 6379)")
    parser.add_argument("--ports", type=int, nargs=2, metavar=("CTLD", "SLURMD"),
                        help="slurm: slurmctld's and slurmd's ports (default 6817 6818)")
    args = parser.parse_args(argv)
    if args.engine == "ray":
        cluster = Ray(args.dir or Ray.default_dir, port=args.port)
    else:
        cluster = Slurm(args.dir or Slurm.default_dir, *(args.ports or (None, None)))
    try:
        if args.command == "start":
            already = running(read_state(cluster.dir))
            cluster.start()
            print(f"{args.engine} {'already running' if already else 'started'} (state in {cluster.dir})")
            for key, value in cluster.env().items():
                print(f"export {key}={value.replace(os.environ.get('PATH', '-'), '$PATH')}")
        elif args.command == "stop":
            cluster.stop()
            print(f"stopped the {args.engine} cluster of {cluster.dir}")
        else:
            state = cluster.status()
            for key, value in state.items():
                print(f"{key}: {value}")
            return 0 if state[args.engine] == "running" else 3
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A single-node Ray cluster on 127.0.0.1 only (`make ray`, hydra/launcher=ray): a head node plus one worker node
(two raylets, as on a real cluster), 1 CPU each, in Ray's loopback mode; RayLoopback puts hydra/launcher=ray's
driver in that mode too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from descent.services import daemons

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
        address = str(OmegaConf.select(config, "hydra.launcher.ray.init.address") or "")
        host, _, port = address.rpartition(":")
        if host not in ("127.0.0.1", "localhost") or not port.isdigit():
            return
        if not daemons.port_open(int(port)):
            print(
                f"hydra/launcher=ray: no Ray cluster answers at {address} (hydra.launcher.ray.init.address, "
                f"from RAY_ADDRESS); start one with `make ray`, or export RAY_ADDRESS=<host:port> of yours",
                file=sys.stderr,
            )
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

    def __init__(
        self,
        dir: str | Path = default_dir,
        port: int | None = None,
        workers: int = 1,
        cpus_per_node: int = 1,
        object_store_mb: int = 100,
    ):
        self.dir = Path(dir).resolve()
        self.port = port or daemons.read_state(self.dir).get("port") or self.default_port
        self.workers, self.cpus, self.store_mb = workers, cpus_per_node, object_store_mb

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, **LOOPBACK}  # without LOOPBACK a driver dials 192.0.2.2:PORT

    def ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def nodes_alive(self) -> int:
        out = subprocess.run(
            [self.ray(), "status", f"--address={self.address}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **LOOPBACK},
        ).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    @staticmethod
    def node_up(log: Path) -> bool:
        # `ray start --block` says so once its node has joined the cluster (cheaper than `ray status`)
        return log.is_file() and "block forever" in log.read_text(errors="replace")

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if daemons.running(daemons.read_state(self.dir)):
            return self.address
        if daemons.port_open(self.port):
            raise daemons.ServiceError(f"port {self.port} is taken (another Ray head?); choose another with --port")
        daemons.ensure_extra("ray", "hydra_plugins.hydra_ray_launcher")
        # Ray's sockets live in its temp dir, and a unix socket path has at most 107 bytes: keep it short
        tmp = Path(f"/tmp/descent-ray-{self.port}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK}
        env.pop("RAY_ADDRESS", None)

        def node_args() -> list[str]:  # per node: fixed default ports that two nodes on one machine would share
            return [
                f"--num-cpus={self.cpus}",
                "--num-gpus=0",
                f"--object-store-memory={self.store_mb * 2**20}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                "--block",
                f"--dashboard-agent-listen-port={daemons.free_port()}",
                f"--metrics-export-port={daemons.free_port()}",
            ]

        state = {"address": self.address, "port": self.port, "temp_dir": str(tmp), "pids": {}}
        head = [
            sys.executable,
            "-c",
            RAY_START,
            "start",
            "--head",
            f"--port={self.port}",
            f"--temp-dir={tmp}",
            "--include-dashboard=false",
            f"--ray-client-server-port={daemons.free_port()}",
            *node_args(),
        ]
        logs = [self.dir / "head.log"] + [self.dir / f"worker{i}.log" for i in range(self.workers)]
        for log in logs:
            log.unlink(missing_ok=True)
        # the nodes' jobs start in this folder (Ray's workers inherit it): started from the project folder,
        # as the make target does, relative paths (data/, outputs/) mean there what they mean to the driver
        state["pids"]["head"] = daemons.spawn(head, logs[0], env=env)
        daemons.write_state(self.dir, state)
        try:
            daemons.wait_for(lambda: self.node_up(logs[0]), f"the Ray head on {self.address}", logs, state["pids"])
            for i in range(self.workers):
                worker = [sys.executable, "-c", RAY_START, "start", f"--address={self.address}", *node_args()]
                state["pids"][f"worker{i}"] = daemons.spawn(worker, logs[i + 1], env=env)
                daemons.write_state(self.dir, state)
            daemons.wait_for(
                lambda: all(self.node_up(log) for log in logs), f"{1 + self.workers} Ray nodes", logs, state["pids"]
            )
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        # a Ray node keeps nothing worth a clean shutdown (its temp dir goes next), and part of the head's
        # process group outlives SIGTERM: SIGKILL after 3 s, not the 20 s the stateful daemons get
        # (measured: the head's group took 22 s to stop, the 20 s grace and the SIGKILL after it)
        daemons.stop_all(self.dir, grace=3)
        tmp = daemons.read_state(self.dir).get("temp_dir")
        if tmp and Path(tmp).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)

    def status(self) -> dict:
        state = daemons.read_state(self.dir)
        up = daemons.running(state)
        return {
            "ray": "running" if up else "stopped",
            "address": self.address if up else None,
            "nodes": self.nodes_alive() if up else 0,
            **{f"pid.{k}": v for k, v in state.get("pids", {}).items()},
        }

"""A single-node SLURM cluster on 127.0.0.1 (`make slurm`, hydra/launcher=slurm): Debian's munged, slurmctld and
slurmd as root, one node `localhost`, partition `debug`, no systemd, no cgroups, no slurmdbd."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from descent.services import daemons

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
# written by python -m descent.services.cluster slurm start: sacct for a cluster without slurmdbd (see slurm_cluster.py)
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
        state = daemons.read_state(self.dir)
        self.ctld_port = ctld_port or state.get("ctld_port") or 6817
        self.slurmd_port = slurmd_port or state.get("slurmd_port") or 6818
        self.conf = self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}"}

    def node_state(self) -> str:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **self.env()},
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if daemons.running(daemons.read_state(self.dir)):
            return str(self.conf)
        if os.geteuid() != 0:
            raise daemons.ServiceError("the single-node SLURM runs its daemons as root: run this as root")
        for port in (self.ctld_port, self.slurmd_port):
            if daemons.port_open(port):
                raise daemons.ServiceError(f"port {port} is taken (another SLURM?); choose others with --ports")
        programs = ["slurmctld", "slurmd", "munged", "sbatch"]
        if not all(shutil.which(p) for p in programs):
            daemons.ensure_apt(["slurm-wlm", "munge"], f"{', '.join(programs)} not found")
        daemons.ensure_extra("slurm", "hydra_plugins.hydra_submitit_launcher")
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
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=self.ctld_port,
                slurmd_port=self.slurmd_port,
                dir=self.dir,
                cpus=os.cpu_count(),
                mem_mb=mem_mb * 3 // 4,
            )
        )  # a quarter left to the rest
        env = {**os.environ, **self.env()}
        state = {"conf": str(self.conf), "ctld_port": self.ctld_port, "slurmd_port": self.slurmd_port, "pids": {}}
        logs = [munge / "munged.log", self.dir / "slurmctld.log", self.dir / "slurmd.log"]
        commands = {
            "munged": [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={logs[0]}",
                f"--seed-file={munge}/munged.seed",
            ],
            "slurmctld": ["slurmctld", "-D", "-i", "-f", str(self.conf)],  # -i: start even on damaged saved state
            "slurmd": ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)],
        }
        try:
            for name, args in commands.items():
                state["pids"][name] = daemons.spawn(args, self.dir / f"{name}.out", env=env, cwd=self.dir)
                daemons.write_state(self.dir, state)
                if name == "munged":
                    daemons.wait_for(lambda: (munge / "munge.socket").exists(), "munged", logs, state["pids"])
            daemons.wait_for(
                lambda: self.node_state() == "idle",
                "the SLURM node (sinfo: idle)",
                logs + [self.dir / f"{n}.out" for n in commands],
                state["pids"],
            )
        except BaseException:
            self.stop()
            raise
        return str(self.conf)

    def stop(self) -> None:
        daemons.stop_all(self.dir)

    def status(self) -> dict:
        state = daemons.read_state(self.dir)
        up = daemons.running(state)
        return {
            "slurm": "running" if up else "stopped",
            "SLURM_CONF": str(self.conf) if up else None,
            "node": self.node_state() if up else None,
            **{f"pid.{k}": v for k, v in state.get("pids", {}).items()},
        }

"""Single-node Ray and SLURM clusters on this machine, for `hydra/launcher=ray|slurm`, without systemd.

    python -m descent.services.cluster ray start|stop|status [--dir outputs/ray] [--port 6379]
    python -m descent.services.cluster slurm start|stop|status [--dir outputs/slurm]

Ray (descent/services/ray_cluster.py): a head node plus one worker node (two raylets, as on a real cluster), 1 CPU
each, on 127.0.0.1 only (Ray's loopback mode, see its LOOPBACK; hydra/launcher=ray puts its driver in it, RayLoopback;
other drivers, `ray status` or a script, need the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that `start` prints).
SLURM (descent/services/slurm_cluster.py): Debian's munged, slurmctld and slurmd as root, one node `localhost`,
partition `debug`; sbatch and squeue find it through the SLURM_CONF that `start` prints. Every daemon is a child in
its own session whose pid is kept in the state folder (descent/services/daemons.py); stop ends those process groups
and nothing else. The make targets and the tests' fixtures both come here, so what a user starts is what the tests
prove.

Starting installs what is missing: the `ray` or `slurm` extra of pyproject.toml (pip), and for SLURM
Debian's slurm-wlm and munge (apt, as root).
"""

from __future__ import annotations

import argparse
import os
import sys

from descent.services.daemons import read_state, run_command, running, show_status
from descent.services.ray_cluster import Ray
from descent.services.slurm_cluster import Slurm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m descent.services.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=("ray", "slurm"))
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", help="state folder: config, logs, pids (default outputs/<engine>)")
    parser.add_argument("--port", type=int, help="ray: the head's GCS port (default 6379)")
    parser.add_argument(
        "--ports",
        type=int,
        nargs=2,
        metavar=("CTLD", "SLURMD"),
        help="slurm: slurmctld's and slurmd's ports (default 6817 6818)",
    )
    args = parser.parse_args(argv)
    if args.engine == "ray":
        cluster = Ray(args.dir or Ray.default_dir, port=args.port)
    else:
        cluster = Slurm(args.dir or Slurm.default_dir, *(args.ports or (None, None)))

    def command() -> int | None:
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
            return show_status(state, state[args.engine] == "running")

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())

"""Debian packages that descent needs at run time: installed with apt as root, unpacked without root.

One home for what the services (descent/services/server.py: PostgreSQL; descent/services/slurm_cluster.py: SLURM
and munge) and the data (descent/data/idx.py: Fashion-MNIST from `dataset-fashion-mnist`) install on first use.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


class DebianError(RuntimeError):
    """A package could not be installed or unpacked; the message says what to run instead."""


def installed(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.endswith("installed") and "not-installed" not in out.stdout


def install(packages: list[str]) -> None:
    """apt-get install as root (refreshing the package lists once if that fails: a fresh machine may have none)."""
    if os.geteuid() != 0:
        raise DebianError(f"as root: apt-get install -y {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(command, env=env, check=True)


def unpack(package: str, dest: Path) -> Path:
    """The package's files under dest (dest/usr/share/...), without root and without installing it:
    `apt-get download` (the package lists are readable by anyone) and `dpkg -x`."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".deb-") as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise DebianError(f"apt-get download {package} failed: {(got.stderr or got.stdout).strip()[-300:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(dest)], check=True, capture_output=True)
    return dest


def files(package: str, scratch: Path) -> Path:
    """Where the package's files are: / once installed (installing it first as root), else unpacked
    under scratch. Raises DebianError when neither works (no apt, no package lists, no mirror)."""
    try:
        if installed(package):
            return Path("/")
        if os.geteuid() == 0:
            print(f"installing {package} (apt-get)", flush=True)
            install([package])
            return Path("/")
        return unpack(package, scratch)
    except FileNotFoundError as e:  # no dpkg / apt-get: not a Debian system
        raise DebianError(f"{e.filename} not found (not a Debian system?)") from e
    except subprocess.CalledProcessError as e:
        raise DebianError(f"{' '.join(map(str, e.cmd))} exited {e.returncode}") from e

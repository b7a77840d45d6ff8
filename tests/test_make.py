"""What each make target installs and runs, as `make -n` prints it for a fresh clone (no .venv yet)."""

import shutil
import subprocess

import pytest

from conftest import ROOT


def dry_run(target: str, tmp_path) -> str:
    if not shutil.which("make"):
        pytest.skip("no make here")
    venv = tmp_path / "venv"  # a .venv that does not exist yet: every install step shows
    proc = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def pip_installs(text: str) -> list[str]:
    return [line.split(" -e ", 1)[1].strip() for line in text.splitlines() if "pip install" in line]


def test_make_train_installs_only_the_base_package(tmp_path):
    out = dry_run("train", tmp_path)
    assert pip_installs(out) == ["."], out
    assert "src/train.py" in out


def test_make_test_installs_every_extra_the_tests_use(tmp_path):
    [spec] = pip_installs(dry_run("test", tmp_path))
    extras = set(spec.strip("'").removeprefix(".[").removesuffix("]").split(","))
    assert {"dev", "server", "ray", "slurm", "optuna", "docs"} <= extras, spec


def test_make_docs_serves_the_site_on_loopback_port_8000(tmp_path):
    out = dry_run("docs", tmp_path)
    assert pip_installs(out) == ["'.[docs]'"], out
    assert "mkdocs serve --strict --dev-addr 127.0.0.1:8000" in out

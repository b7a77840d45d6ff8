"""`python src/train.py --help` is the project's own text (conf/hydra/help/descent.yaml), true to conf/:
every group with its options, and examples that compose into valid configs. No training runs."""

import itertools
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import ROOT
from descent.config import validate

CONF = ROOT / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir() and g.name != "hydra"}


def help_text(*overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *overrides, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def text():
    return help_text()


def test_help_is_the_projects_text_with_every_group_and_its_options(text):
    assert "is powered by Hydra" not in text  # Hydra's stock header
    assert text.startswith("descent: the opening chapter of Deep Learning with Python")
    for group, options in GROUPS.items():
        assert f"\n{group}: {', '.join(options)}\n" in text, group
    for section in (
        "== Examples ==",
        "== Where runs are recorded ==",
        "sqlite:///mlflow.db",
        "make ui",
        "outputs/runs/<date>/<time>/",
        "hydra/launcher=ray",
    ):
        assert section in text, section
    assert "\nseed: 0\n" in text and "  max_epochs: 5\n" in text  # the composed config, at its end


def test_help_shows_the_config_the_command_line_composes():
    assert "_target_: torch.optim.SGD" in help_text("optimizer=sgd")


def compose_job(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the presets' ${hydra:runtime.choices...} resolve
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_every_example_of_the_help_composes_into_a_valid_config(text):
    examples = text.split("== Examples ==\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 6
    try:
        for line in examples:
            args = shlex.split(line.split("#", 1)[0])[2:]  # after `python src/train.py`
            if any(a.startswith("resume=") for a in args):
                continue  # needs a run; tests/test_resume_overrides.py runs these forms
            sweep = "-m" in args
            args = [a for a in args if a != "-m"]
            values = [[f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")] if sweep else [a] for a in args]
            for job in itertools.product(*values):
                validate(compose_job(list(job)))
    finally:
        HydraConfig.instance().cfg = None

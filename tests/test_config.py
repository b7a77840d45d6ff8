"""Every option of every config group composes and instantiates; bad options get hydra's list."""

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, train

CONF = ROOT / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def test_groups_are_the_documented_ones():
    assert GROUPS["optimizer"] == [
        "adam",
        "adamw",
        "lbfgs",
        "muon",
        "muon_mlp2",
        "nesterov",
        "rmsprop",
        "sgd",
        "sgd_momentum",
    ]
    assert GROUPS["batching"] == ["full", "mini", "online"]
    assert {"data", "model", "experiment"} <= set(GROUPS)


def test_defaults_are_the_seed_run():
    cfg = compose_with()
    assert cfg.optimizer._target_ == "torch.optim.RMSprop"
    assert (cfg.optimizer.lr, cfg.optimizer.alpha, cfg.optimizer.eps) == (1e-3, 0.9, 1e-7)  # keras' rmsprop
    assert cfg.data.batch_size == 128 and cfg.trainer.max_epochs == 5
    assert cfg.data.val_size == 0 and cfg.data.limit_train is None
    assert cfg.model.init == "keras"
    assert compose_with("experiment=chollet") == cfg


# the toy losses and their gradient oracle only go together (tests/test_toy.py, test_validation.py's PARTNER)
TOYS = {("model", "double_well"), ("model", "rosenbrock"), ("data", "toy")}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUPS.items() for o in opts if g != "experiment" and (g, o) not in TOYS]
)
def test_every_option_composes_and_instantiates(group, option):
    cfg = compose_with(f"{group}={option}", *NEEDS.get((group, option), ()))
    net = instantiate(cfg.model)
    expected = PARAMETERS["mlp2" if (group, option) in NEEDS else cfg_choice(group, option, "model", "mlp")]
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.zeros(2, 784)).shape == (2, 10)  # every network reads the in-memory N x 784 rows
    make_opt = instantiate(cfg.optimizer)
    assert isinstance(make_opt, partial)
    opt = make_opt(net.named_parameters())  # as the module passes them (descent.nets.optim.MuonAdamW picks by name)
    assert isinstance(opt, torch.optim.Optimizer)
    dm = instantiate(cfg.data, seed=cfg.seed)
    assert dm.batch_size == {"mini": 128, "online": 1, "full": None}.get(cfg_choice(group, option, "batching"), 128)
    names = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "torchvision": "CIFAR10"}  # digits, npz: no name
    data = cfg_choice(group, option, "data", "mnist")
    assert getattr(dm, "name", None) == names.get(data)


def cfg_choice(group, option, wanted, default="mini"):
    return option if group == wanted else default


# an option made for another network than its group's default: composed with it
NEEDS = {("optimizer", "muon_mlp2"): ["model.hidden=[512,512]"]}  # Muon on the hidden-to-hidden matrix

PARAMETERS = {  # keras' model.summary() of the book's networks
    "mlp": 784 * 512 + 512 + 512 * 10 + 10,  # 407050
    "mlp2": 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10,  # model.hidden=[512,512]: 669706
    "linear": 784 * 10 + 10,  # 7850
    "cnn": (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (3 * 3 * 128 * 10 + 10),  # 104202 (ch. 8)
}


@pytest.mark.parametrize("preset", GROUPS["experiment"])
def test_every_experiment_preset_composes(preset):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the presets' lr interpolations read hydra:runtime.choices
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        opt = instantiate(cfg.optimizer)(instantiate(cfg.model).named_parameters())
        assert opt.defaults["lr"] > 0
    finally:
        HydraConfig.instance().cfg = None


def test_keras_init_is_glorot_uniform_with_zero_bias():
    net = instantiate(compose_with().model)
    w = net[0].weight
    limit = (6 / (784 + 512)) ** 0.5
    assert w.abs().max() <= limit and w.abs().max() > 0.95 * limit
    assert torch.count_nonzero(net[0].bias) == 0 and torch.count_nonzero(net[2].bias) == 0


def test_unknown_option_lists_the_available_ones(tmp_path):
    proc = train("optimizer=adamm", cwd=tmp_path, store=f"sqlite:///{tmp_path / 'mlflow.db'}", check=False)
    assert proc.returncode != 0
    assert "Could not find 'optimizer/adamm'" in proc.stderr
    for name in GROUPS["optimizer"]:
        assert name in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was created


def test_descent_config_imports_without_torch_or_hydra_and_registers_its_resolvers_only_when_asked():
    # src/compare.py imports it (tracking/store.py's ConfigError) on its light path; the entry points call register()
    code = """
import importlib, sys
from omegaconf import OmegaConf
import descent.config as c
from descent.config import ConfigError
heavy = ("torch", "lightning", "pytorch_lightning", "mlflow")
print(sorted(m for m in (*heavy, "hydra") if m in sys.modules))
for module in ("rules", "schema", "checks", "sweeps", "resume", "resolvers"):  # all of it: still no torch
    importlib.import_module(f"descent.config.{module}")
print(sorted(m for m in heavy if m in sys.modules))
names = ("descent.direction", "descent.held_out", "descent.at_most", "descent.times_2_over_L")
print(any(OmegaConf.has_resolver(n) for n in names))
c.register()
print(all(OmegaConf.has_resolver(n) for n in names))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout
    assert out.splitlines() == ["[]", "[]", "False", "True"], out

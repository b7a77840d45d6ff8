"""Classification sets read whole from other files: scikit-learn's 8x8 digits, the sets torchvision.datasets reads
(CIFAR, KMNIST, EMNIST, SVHN) whose files are there, and a user's arrays in an .npz, checked before loading."""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import psutil
import torch
import torchvision.datasets  # no start-up cost: lightning has imported it already

from descent.console.terminal import shown
from descent.data.datasets import DIGITS_SPLIT_SEED, TABLE, describe
from descent.data.memory import DataError, InMemoryDataModule

log = logging.getLogger(__name__)


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
        # scikit-learn: 0.6-0.8 s of start-up on top of torch and lightning, paid by data=digits alone
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        facts = TABLE["digits"]
        digits = load_digits()
        x, y = digits.images, digits.target
        train, test = train_test_split(
            np.arange(len(y)), test_size=facts.n_test, stratify=y, random_state=DIGITS_SPLIT_SEED
        )
        if (len(train), len(test)) != (facts.n_train, facts.n_test) or x.max() > 16:
            raise DataError(
                f"scikit-learn's digits: {len(train)}/{len(test)} examples, pixels up to {x.max()}; "
                f"expected {facts.n_train}/{facts.n_test}, pixels 0..16"
            )
        splits = {"train": _tensors(x[train], y[train], 16.0), "test": _tensors(x[test], y[test], 16.0)}
        return splits, facts.shape, facts.classes, f"digits from scikit-learn {self._file().parent}"

    @staticmethod
    def _file() -> Path:
        import sklearn.datasets  # as in read()

        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"

    def split_source(self, context: str) -> str:
        return self._file().as_uri()


class TorchvisionDataModule(InMemoryDataModule):
    """A classification set torchvision.datasets reads (data.name: CIFAR10, CIFAR100, KMNIST, EMNIST, SVHN, ...;
    descent/data/datasets.py's table): the files under data.root in torchvision's layout, else torchvision's download
    where the internet answers. Images are held as N x C*H*W rows in [0, 1], channels first."""

    def __init__(self, root: str = "data", name: str = "CIFAR10", download: bool = True, **common):
        super().__init__(**common)
        self.root, self.name, self.download = Path(root), name, download
        self.title = name.lower()  # the MLflow datasets' name: cifar10 (train, 50000×3072)
        self.folder = self.root

    def _open(self, split: str):
        cls, kwargs = getattr(torchvision.datasets, self.name), TABLE[self.name].torchvision[split]
        try:
            return cls(str(self.root), download=False, **kwargs), "files in"
        except (RuntimeError, OSError) as missing:
            if not self.download:
                raise DataError(
                    f"data.name={self.name}: torchvision.datasets.{self.name} found no valid files under "
                    f"data.root={self.root} ({missing}); {TABLE[self.name].offline}"
                ) from missing
        try:
            return cls(str(self.root), download=True, **kwargs), "downloaded by torchvision to"
        except Exception as e:  # no internet is the normal case here: the log says why, the error what to do
            log.debug("torchvision download unavailable (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise DataError(
                f"data.name={self.name}: no files under data.root={self.root} and torchvision could not "
                f"download them ({type(e).__name__}); offline: {TABLE[self.name].offline}"
            ) from e

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
                raise DataError(
                    f"{self.name} under {self.root}: {split} split of shape {x.shape} with {len(y)} "
                    f"labels; expected N x {'x'.join(map(str, facts.shape))} and N labels"
                )
            if len(y) and (y.min() < 0 or y.max() >= facts.classes):
                raise DataError(
                    f"{self.name} under {self.root}: {split} labels {y.min()}..{y.max()}; "
                    f"expected 0..{facts.classes - 1}"
                )
            splits[split] = _tensors(x, y, 255.0 if x.dtype == np.uint8 else None)
            self.folder = Path(getattr(ds, "raw_folder", None) or Path(ds.root) / getattr(ds, "base_folder", ""))
        return splits, facts.shape, facts.classes, f"{self.name}, {how} {shown(self.folder, Path.cwd())}"

    def split_source(self, context: str) -> str:
        return self.folder.resolve().as_uri()


# ---------------------------------------------------------------------------------------------
# a user's arrays: an .npz of x_train, y_train, x_test, y_test (and x_val, y_val), checked before loading

REQUIRED, OPTIONAL = ("x_train", "y_train", "x_test", "y_test"), ("x_val", "y_val")
NPZ_ALLOWED = (
    "x_*: N x D features, N x H x W or N x C x H x W images; uint8 (scaled by 1/255) or float; "
    "y_*: N integer labels 0..K-1"
)


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype from its .npy header in the zip, without reading its data."""
    where = f"data.path={path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file; allowed: an .npz (numpy.savez) with {', '.join(REQUIRED)}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        what = (
            "a pickle (never loaded)"
            if head[:1] == b"\x80"
            else "a single .npy array"
            if head == b"\x93N"
            else "not a zip archive"
        )
        raise DataError(
            f"{where}: not an .npz ({what}); allowed: a NumPy .npz archive as numpy.savez or "
            f"numpy.savez_compressed writes, holding {', '.join(REQUIRED)}"
        )
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
        raise DataError(
            f"{where}: no array {', '.join(missing)} (arrays in the file: {given}); "
            f"allowed names: {', '.join(REQUIRED + OPTIONAL)}"
        )
    if unknown := [n for n in found if n not in REQUIRED + OPTIONAL]:
        raise DataError(f"{where}: unknown array {', '.join(unknown)}; allowed names: {', '.join(REQUIRED + OPTIONAL)}")
    if ("x_val" in found) != ("y_val" in found):
        raise DataError(
            f"{where}: {'x_val' if 'x_val' in found else 'y_val'} without "
            f"{'y_val' if 'x_val' in found else 'x_val'}; allowed: both or neither"
        )
    for name, (shape, dtype) in found.items():
        if dtype.hasobject:
            raise DataError(
                f"{where}: {name}: dtype object (pickled Python objects, never loaded); allowed: "
                + ("uint8 or float" if name[0] == "x" else "integers")
            )
        if name[0] == "x":
            if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
                raise DataError(
                    f"{where}: {name}: dtype {dtype}; allowed: uint8 (pixels 0..255, scaled by 1/255) "
                    "or float16/32/64 (used as they are)"
                )
            if len(shape) not in (2, 3, 4) or 0 in shape[1:]:
                raise DataError(
                    f"{where}: {name}: shape {shape}; allowed: N x D features, N x H x W or N x C x H x W images"
                )
        else:
            if not np.issubdtype(dtype, np.integer):
                raise DataError(
                    f"{where}: {name}: dtype {dtype}; labels must be integers 0..K-1 (e.g. "
                    f"{name}.astype(np.int64) once they are whole numbers)"
                )
            if len(shape) != 1:
                raise DataError(f"{where}: {name}: shape {shape}; allowed: one label per example (N,)")
    for split in ("train", "val", "test"):
        if f"x_{split}" in found and found[f"x_{split}"][0][0] != found[f"y_{split}"][0][0]:
            raise DataError(
                f"{where}: x_{split} has {found[f'x_{split}'][0][0]} examples, y_{split} "
                f"{found[f'y_{split}'][0][0]}; allowed: one label per example"
            )
        if f"x_{split}" in found and found[f"x_{split}"][0][1:] != found["x_train"][0][1:]:
            raise DataError(
                f"{where}: x_{split} examples of shape {found[f'x_{split}'][0][1:]}, x_train's "
                f"{found['x_train'][0][1:]}; allowed: the same shape in every split"
            )
    if found["x_train"][0][0] < 1:
        raise DataError(f"{where}: x_train has no example; allowed: at least one")
    need = sum(math.prod(shape) * (4 if name[0] == "x" else 8) for name, (shape, _) in found.items())
    free = _available_memory()
    if need > free:
        raise DataError(
            f"{where}: held in memory as float32 the set takes {_bytes(need)}, more than the "
            f"{_bytes(free)} this machine has available; allowed: a set that fits (fewer examples, "
            "smaller images)"
        )


def _available_memory() -> int:
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
            raise DataError(
                f"{where}: {name}: {a[tuple(bad)]} at index {tuple(int(i) for i in bad)}; allowed: finite "
                "numbers (no NaN or inf)"
            )
    present = np.unique(arrays["y_train"])
    classes = int(present.max()) + 1
    if present.min() < 0:
        raise DataError(f"{where}: y_train: label {present.min()}; allowed: integers 0..K-1")
    if len(present) != classes:
        skipped = sorted(set(range(classes)) - set(present.tolist()))
        which = f"class {skipped[0]} has" if len(skipped) == 1 else f"classes {', '.join(map(str, skipped[:10]))} have"
        raise DataError(
            f"{where}: y_train: labels up to {classes - 1} but {which} no example; allowed: integers "
            "0..K-1, each class at least once in y_train"
        )
    if classes < 2:
        raise DataError(f"{where}: y_train: one class only; allowed: at least two classes 0..K-1")
    for name in ("y_test", "y_val"):
        if name in arrays and len(arrays[name]) and (arrays[name].min() < 0 or arrays[name].max() >= classes):
            raise DataError(
                f"{where}: {name}: labels {arrays[name].min()}..{arrays[name].max()}; allowed: the "
                f"classes of y_train, 0..{classes - 1}"
            )
    x = arrays["x_train"]
    shape = x.shape[1:] if x.ndim != 3 else (1, *x.shape[1:])
    splits = {
        context: _tensors(
            arrays[f"x_{split}"], arrays[f"y_{split}"], 255.0 if arrays[f"x_{split}"].dtype == np.uint8 else None
        )
        for context, split in (("train", "train"), ("test", "test"), ("validation", "val"))
        if f"x_{split}" in arrays
    }
    return splits, tuple(int(s) for s in shape), classes


class NpzDataModule(InMemoryDataModule):
    """A user's arrays from a NumPy .npz (data.path): see read_npz and docs/how-to/your-own-data.md."""

    def __init__(self, path: str = "data.npz", **common):
        super().__init__(**common)
        self.path = Path(path)
        self.title = self.path.stem  # the MLflow datasets' name: mydata (train, 1000×64)

    def read(self):
        splits, shape, classes = read_npz(self.path)
        return splits, shape, classes, (f"{describe(shape)}, {classes} classes, from {shown(self.path, Path.cwd())}")

    def split_source(self, context: str) -> str:
        return self.path.resolve().as_uri()

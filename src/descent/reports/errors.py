"""What the model gets wrong on the test set, on the run's MLflow page (artifacts under errors/):

  confusion_matrix.png   rows the true class, columns the predicted one (scikit-learn's display)
  confusion_matrix.json  the same counts as an MLflow table
  per_class.json         precision, recall, F1 and support per class (an MLflow table the UI shows)
  misclassified.png      the most confidently misclassified test images, true and predicted labels
  misclassified.json     every misclassified test image: index, true, predicted, confidence

Shapes and classes come from the data: the image shape from the data module (`image_shape`) or the test
tensor itself, the class names from the data module (`classes`), else 0..k-1 for the network's k outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from descent.tracking import store

GRID = 25  # images in the misclassified grid (5 x 5), the most confident mistakes first
DIR = "errors"


def image_shape(datamodule, x: torch.Tensor) -> tuple[int, ...]:
    """One example's shape as an image: the data module's, else the tensor's own, else a square (N x H*W)."""
    shape = getattr(datamodule, "image_shape", None) or getattr(datamodule, "shape", None)
    if shape is None and x.dim() > 2:
        shape = x.shape[1:]
    if shape is None:
        n = x[0].numel()
        side = math.isqrt(n)
        shape = (side, side) if side * side == n else (1, n)  # not an image: a strip of its features
    return tuple(int(s) for s in shape)


def class_names(datamodule, k: int) -> list[str]:
    names = getattr(datamodule, "classes", None)  # descent's data modules hold the count; a list names them
    if isinstance(names, (list, tuple)) and len(names) == k:
        return [str(n) for n in names]
    if getattr(datamodule, "name", None) == "FashionMNIST":
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)
    return [str(i) for i in range(k)]


def to_image(example: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An example as imshow draws it: (H, W) grey, or (H, W, C) from channels first (C, H, W) or last."""
    image = example.reshape(shape)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3:  # colour: imshow wants [0, 1] floats
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else image * 0
    return image


def analyse(probs: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict:
    """The confusion matrix, the per-class table and the misclassified examples (most confident first)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = probs.shape[1]
    labels = list(range(k))
    true = y.cpu().numpy()
    confidence, pred = probs.max(1)
    pred, confidence = pred.numpy(), confidence.numpy()
    matrix = confusion_matrix(true, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    wrong = np.flatnonzero(pred != true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return {
        "matrix": matrix,
        "per_class": {
            "class": labels,
            "label": names,
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
            "errors": (support - np.diag(matrix)).tolist(),
        },
        "wrong": {
            "index": wrong.tolist(),
            "true": [names[i] for i in true[wrong]],
            "predicted": [names[i] for i in pred[wrong]],
            "confidence": confidence[wrong].tolist(),
        },
    }


def confusion_figure(matrix: np.ndarray, names: list[str], title: str):
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(names)
    size = min(max(4.5, 0.5 * k + 2), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(
        ax=ax,
        colorbar=False,
        values_format="d",
        include_values=k <= 30,
        xticks_rotation=45 if k > 10 or max(map(len, names)) > 3 else "horizontal",
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def montage(images: list[np.ndarray], cols: int, pad: int, top: int) -> np.ndarray:
    """Images of one shape in rows of `cols`: `pad` pixels between them, `top` above each (for its labels)."""
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / cols)
    sheet = np.full((rows * (h + top), cols * (w + pad) + pad, *images[0].shape[2:]), np.nan)  # NaN: blank
    for n, image in enumerate(images):
        r, c = divmod(n, cols)
        y, x = r * (h + top) + top, pad + c * (w + pad)
        sheet[y : y + h, x : x + w] = image
    return sheet


def misclassified_figure(x: torch.Tensor, wrong: dict, shape: tuple[int, ...], n: int, title: str):
    """One picture of the first n mistakes (one imshow of a montage: 25 subplots cost ~1 s more to draw)."""
    import matplotlib.pyplot as plt

    shown = min(n, len(wrong["index"]))
    if not shown:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no test image misclassified", ha="center", va="center")
        ax.set_title(title, fontsize=9)
        return fig
    index = wrong["index"][:shown]
    images = [to_image(e, shape) for e in x[index].detach().cpu().float().numpy()]
    h, w = images[0].shape[:2]
    cols = math.ceil(math.sqrt(shown)) if w <= 4 * h else 1  # a strip of features: one per row
    pad, top = max(2, w // 10), max(4, round(h * 0.6))  # room above each image for its two lines
    sheet = montage(images, cols, pad, top)
    inches = 1.6 / h  # per pixel: an image about 1.6 inches high
    fig, ax = plt.subplots(figsize=(max(sheet.shape[1] * inches, 6), sheet.shape[0] * inches + 0.5))
    ax.imshow(sheet, cmap="binary" if sheet.ndim == 2 else None, interpolation="nearest")
    ax.axis("off")
    for k, (i, true, pred, conf) in enumerate(zip(index, wrong["true"], wrong["predicted"], wrong["confidence"])):
        r, c = divmod(k, cols)
        ax.text(
            pad + c * (w + pad) + w / 2,
            r * (h + top) + top - 1,
            f"#{i} true {true}\npredicted {pred} ({conf:.0%})",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def log_errors(logger, logits: torch.Tensor, datamodule, data_name: str = "", grid: int = GRID) -> dict:
    """Everything above for the run `logger` writes to, from the test set's class scores in order (the test
    step's); returns what analyse() found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = datamodule.x_test, datamodule.y_test
    if len(logits) != len(y):
        raise ValueError(f"{len(logits)} class scores for {len(y)} test images")
    probs = torch.softmax(logits.detach().float(), 1).cpu()
    names = class_names(datamodule, probs.shape[1])
    found = analyse(probs, y, names)
    client, run_id = logger.experiment, logger.run_id
    n, errors = len(y), len(found["wrong"]["index"])
    what = f"{data_name + ' ' if data_name else ''}test set: {errors} of {n} misclassified ({1 - errors / n:.2%} right)"
    fig = confusion_figure(found["matrix"], names, f"Confusion matrix, {what}")
    client.log_figure(run_id, fig, f"{DIR}/confusion_matrix.png")
    plt.close(fig)
    fig = misclassified_figure(
        x, found["wrong"], image_shape(datamodule, x), grid, f"The {min(grid, errors)} most confident mistakes, {what}"
    )
    client.log_figure(run_id, fig, f"{DIR}/misclassified.png")
    plt.close(fig)
    matrix = {"true": names} | {f"predicted {name}": found["matrix"][:, j].tolist() for j, name in enumerate(names)}
    for table, name in (
        (matrix, "confusion_matrix"),
        (found["per_class"], "per_class"),
        (found["wrong"], "misclassified"),
    ):
        store.log_table(client, run_id, table, f"{DIR}/{name}.json")
    return found

"""The book's seed listing in Keras 3 on the torch backend, timed per epoch; run by bench.py in its own process.

Same data (descent.data.load_split), same data order (epoch_permutation, one fit call per epoch with
shuffle=False), same initial weights (descent.nets.MLP with keras init, seed 0) as the other contenders.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # must be set before keras is imported

import keras  # noqa: E402
import torch  # noqa: E402

from descent.data import ensure_data, epoch_permutation, load_split  # noqa: E402
from descent.nets import MLP  # noqa: E402

from bench_worker import Others, rss_mib  # noqa: E402  (benchmarks/ is this script's folder, first on sys.path)


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds, self.others = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.busy = Others()
        self.tic = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.tic)
        self.others.append(self.busy.share())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="first N training examples; 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        help="stop after the epoch that passes this many seconds "
        "(never before warm-up + 1 timed epoch); 0 = run all epochs",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    assert keras.backend.backend() == "torch", keras.backend.backend()
    base = rss_mib("VmRSS")

    ensure_data(args.data, download=False)
    x, y = load_split(args.data, train=True)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    x_test, y_test = load_split(args.data, train=False)
    x, x_test = x.numpy(), x_test.numpy()
    y, y_test = keras.utils.to_categorical(y.numpy(), 10), keras.utils.to_categorical(y_test.numpy(), 10)

    # the listing (Deep Learning with Python, ch. 2)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    torch.manual_seed(args.seed)  # descent's initial weights: glorot-uniform kernels, zero biases
    net = MLP(init="keras")
    for dense, linear in zip(model.layers, (net[0], net[2])):
        dense.set_weights([linear.weight.detach().T.numpy(), linear.bias.detach().numpy()])

    timer = EpochTimer()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        if epoch >= 2 and args.budget and time.perf_counter() - start > args.budget:
            break
        perm = epoch_permutation(len(x), args.seed, epoch).numpy()
        model.fit(
            x[perm],
            y[perm],
            batch_size=128,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,
            verbose=0,
            callbacks=[timer],
        )
    steps = -(-len(x) // 128)
    _, acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    with open(args.out, "w") as f:
        json.dump(
            {
                "seconds": timer.seconds,
                "others": timer.others,
                "updates": [steps] * len(timer.seconds),
                "test_acc": acc,
                "peak_rss_mib": rss_mib("VmHWM"),
                "base_rss_mib": base,
                "keras": keras.__version__,
            },
            f,
        )


if __name__ == "__main__":
    main()

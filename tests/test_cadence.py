"""trainer.val_every_share: the validation gap grows with the run, on one deterministic sequence of points."""

from functools import partial

import torch
from conftest import lightning_fit

from descent.data import IDXDataModule
from descent.engine import cadence
from descent.engine.loop import Classifier
from descent.nets import MLP

N, BS, EVERY, SHARE = 320, 16, 16, 0.25


def test_the_gap_grows_to_its_share_of_the_examples_seen():
    points = [cadence.next_point(0, EVERY, SHARE)]
    while points[-1] < 5000:
        points.append(cadence.next_point(points[-1], EVERY, SHARE))
    gaps = [b - a for a, b in zip(points, points[1:])]
    assert points[:5] == [16, 32, 48, 64, 80]  # a fixed gap while share x examples is below it
    assert all(g == max(EVERY, int(SHARE * a)) for a, g in zip(points, gaps))
    assert gaps[-1] > 10 * EVERY  # and then a share: far fewer checks
    assert cadence.next_point(999, EVERY, None) == 1008  # without a share, the fixed grid


def test_a_resumed_run_finds_the_same_next_point_from_any_count():
    # a resumed run knows only its examples: the next point must be the one the run left alone would reach
    points = [cadence.next_point(0, EVERY, SHARE)]
    while points[-1] < 3000:
        points.append(cadence.next_point(points[-1], EVERY, SHARE))
    for e in range(0, 3000, 7):
        assert cadence.next_point(e, EVERY, SHARE) == min(p for p in points if p > e)


def test_the_run_validates_on_that_sequence(mnist_root):
    dm = IDXDataModule(root=str(mnist_root), download=False, limit_train=N, val_size=100, batch_size=BS, seed=0)
    module = Classifier(
        MLP(hidden=[16]),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        log_every_examples=N,
        val_every_examples=EVERY,
        val_every_share=SHARE,
    )
    seen = []
    module.measures.append(lambda point: seen.append(point.examples) or {})
    lightning_fit(module, dm, epochs=2)
    expected, upcoming = [], cadence.next_point(0, EVERY, SHARE)
    for e in range(BS, 2 * N + 1, BS):  # after each update; at each epoch's end
        if e >= upcoming or e % N == 0:
            expected.append(e)
            upcoming = cadence.next_point(e, EVERY, SHARE)
    assert seen == expected
    assert expected[:8] == [16, 32, 48, 64, 80, 112, 128, 160]  # the gap grows: 16, then 20, 25, 31 ...

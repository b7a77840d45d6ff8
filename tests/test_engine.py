"""What the engine hands its neighbours: the data its position, the measurements a Point, lightning its updates."""

from functools import partial

import pytest
import torch
from conftest import lightning_fit

from descent.data import IDXDataModule
from descent.engine.loop import Classifier
from descent.measure import Point
from descent.nets import MLP

N, BS = 300, 64  # 5 updates an epoch, the last on a partial batch of 44


class Recorder:
    """A measurement that keeps what it was handed, and what the module's counters were at that moment."""

    def __init__(self, module):
        self.module, self.seen = module, []

    def __call__(self, point):
        self.seen.append((point, self.module.updates, self.module.examples))
        return {}


@pytest.fixture(scope="module")
def fitted(mnist_root):
    dm = IDXDataModule(root=str(mnist_root), download=False, limit_train=N, val_size=100, batch_size=BS, seed=0)
    module = Classifier(
        MLP(hidden=[16]), optimizer=partial(torch.optim.SGD, lr=0.1), log_every_examples=BS, val_every_examples=2 * BS
    )
    recorder = Recorder(module)
    module.measures.append(recorder)
    lightning_fit(module, dm, epochs=2)
    return module, dm, recorder, module.trainer


def test_the_engine_tells_the_data_where_an_epoch_starts(fitted):
    module, dm, _, _ = fitted
    assert (module.offset_epoch, module.epoch_offset) == (1, N)  # after the last example of the second epoch
    assert dm.position() == (1, N)
    module.offset_epoch, module.epoch_offset = 3, 7  # the data asks the module each time, not a copy
    try:
        assert dm.position() == (3, 7)
    finally:
        module.offset_epoch, module.epoch_offset = 1, N


def test_measurements_get_a_point_of_what_they_measure(fitted):
    module, dm, recorder, _ = fitted
    assert len(recorder.seen) >= 4  # every 128 examples and at each epoch end
    for point, updates, examples in recorder.seen:
        assert isinstance(point, Point)
        assert point.net is module.net and point.optimizer is module.opt and point.criterion is module.criterion
        assert point.x_train is dm.x_train and point.y_train is dm.y_train
        assert (point.updates, point.examples) == (updates, examples)
        assert "val/acc" in point.latest  # logged before the measurements run


def test_lightning_counts_the_updates_the_loop_takes(fitted):
    module, _, _, trainer = fitted
    assert module.updates == 2 * -(-N // BS) == trainer.global_step

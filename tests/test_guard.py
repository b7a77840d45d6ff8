"""Correctness guard: the chunked fast path performs the same updates as the plain PyTorch loop."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, plain_fit
from descent.data import IDXDataModule
from descent.engine.loop import Classifier, segments

N, EPOCHS, SEED = 600, 2, 7


def optimizer(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return instantiate(compose("train", overrides=[f"optimizer={name}"]).optimizer)


CASES = [(opt, bs, False) for opt in ("sgd_momentum", "rmsprop") for bs in (1, 128, None)]
CASES.append(("rmsprop", 128, True))  # one compiled optimizer step: compiling costs ~14 s on a cold cache


@pytest.mark.parametrize(
    "opt_name,batch_size,compiled",
    CASES,
    ids=[f"{o}-{ {1: 'online', 128: 'mini', None: 'full'}[b] }{'-compiled' * c}" for o, b, c in CASES],
)
def test_fast_path_matches_plain_loop(mnist_root, opt_name, batch_size, compiled):
    torch.manual_seed(0)
    net = instantiate({"_target_": "descent.nets.MLP"})
    reference, initial = copy.deepcopy(net), copy.deepcopy(net)

    # chunk_size 256 puts several updates in a chunk (mini), and splits the full batch of 600 in 3 pieces
    dm = IDXDataModule(root=str(mnist_root), limit_train=N, batch_size=batch_size, chunk_size=256, seed=SEED)
    module = Classifier(net=net, optimizer=optimizer(opt_name), log_every_examples=100, compile_optimizer=compiled)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)

    bs = batch_size or N
    updates = plain_fit(reference, optimizer(opt_name), dm, batch_size=bs, epochs=EPOCHS, seed=SEED)
    assert module.updates == updates == EPOCHS * -(-N // bs)
    for p, q, p0 in zip(net.parameters(), reference.parameters(), initial.parameters()):
        assert not torch.allclose(q, p0, atol=1e-4)  # training moved the weights
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,bs,chunk", [(1000, 128, 256), (600, 600, 256), (7, 1, 3), (1000, 300, 256)])
def test_segments_split_at_update_boundaries(n, bs, chunk):
    from descent.data import chunk_length

    step = chunk_length(bs, chunk)
    steps, seen = [], 0
    for offset in range(0, n, step):
        length = min(step, n - offset)
        for a, b, batch_len, ends in segments(offset, length, n, bs):
            assert 0 <= a < b <= length
            seen += b - a
            if ends:
                steps.append(batch_len)
    assert seen == n
    assert steps == [bs] * (n // bs) + ([n % bs] if n % bs else [])  # keras/DataLoader: last batch partial

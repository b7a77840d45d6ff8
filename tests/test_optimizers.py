"""AdamW, Muon (with AdamW on the rest) and L-BFGS: the same updates as a plain PyTorch loop; L-BFGS's
closure across chunks, its exact resume, and the checks of their config."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, lightning_fit
from descent.config import ConfigError, validate
from descent.data import MNISTDataModule
from descent.engine.loop import Classifier
from descent.engine.reference import plain_train

N, EPOCHS, SEED = 600, 2, 7


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


class Both:
    """torch.optim.Muon's docstring: Muon on the 2-D weights, AdamW on the rest, stepped one after the other."""

    def __init__(self, net, cfg):
        muon = {k: cfg[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "ns_steps", "adjust_lr_fn")}
        self.muon = torch.optim.Muon([net[0].weight], **muon)
        self.adamw = torch.optim.AdamW([net[0].bias, net[2].weight, net[2].bias], **cfg.adamw)

    def zero_grad(self):
        self.muon.zero_grad()
        self.adamw.zero_grad()

    def step(self):
        self.muon.step()
        self.adamw.step()


def fit(net, opt_cfg, batch_size, epochs=EPOCHS, ckpt_path=None, root=None, cuda_graphs=False):
    dm = MNISTDataModule(root=str(root), limit_train=N, batch_size=batch_size, chunk_size=256, seed=SEED)
    module = Classifier(net=net, optimizer=instantiate(opt_cfg), log_every_examples=100, cuda_graphs=cuda_graphs)
    return lightning_fit(module, dm, epochs, ckpt=ckpt_path, weights_only=False)


# chunk_size 256: mini puts 2 updates in a chunk; the full batch (600) spreads over 3 chunks, which the
# closure gathers whole at its last piece; 200 lies in a chunk. graph: the graph path's step, uncaptured
# (trainer.cuda_graphs=true on CPU, as tests/test_graphs.py); L-BFGS falls back to the eager loop there
# (muon: one epoch, its Newton-Schulz iterations cost ~10x an SGD update on CPU)
CASES = [("adamw", 128, False), ("muon", 128, False), ("muon", 128, True), ("lbfgs", None, True), ("lbfgs", 200, False)]


@pytest.mark.parametrize("name,batch_size,graph", CASES, ids=[f"{n}-{b or 'full'}{'-graph' * g}" for n, b, g in CASES])
def test_new_optimizers_match_plain_loop(mnist_root, name, batch_size, graph):
    torch.manual_seed(0)
    net = instantiate({"_target_": "descent.nets.MLP"})
    reference, initial = copy.deepcopy(net), copy.deepcopy(net)
    opt_cfg = config(f"optimizer={name}").optimizer
    epochs = 1 if name == "muon" else EPOCHS
    module, dm = fit(net, opt_cfg, batch_size, epochs=epochs, root=mnist_root, cuda_graphs=graph)
    assert (module.graph is not None) == (graph and name != "lbfgs")

    bs = batch_size or N
    plain = Both(reference, opt_cfg) if name == "muon" else instantiate(opt_cfg)(reference.parameters())
    updates = plain_train(reference, plain, dm.x_train, dm.y_train, batch_size=bs, epochs=epochs, seed=SEED)
    assert module.updates == updates == epochs * -(-N // bs)
    if name == "lbfgs":  # the line search evaluates each batch at least twice (the start, one trial step)
        assert module.evaluations >= 2 * module.updates
        assert module.latest["progress/evaluations"] == module.evaluations
    for p, q, p0 in zip(net.parameters(), reference.parameters(), initial.parameters()):
        assert not torch.allclose(q, p0, atol=1e-4)  # training moved the weights
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_lbfgs_resumes_exactly(mnist_root, tmp_path):
    # 3 updates per epoch: the checkpoint after epoch 1 holds L-BFGS's curvature pairs, which epoch 2 uses
    opt_cfg = config("optimizer=lbfgs").optimizer
    torch.manual_seed(0)
    net = instantiate({"_target_": "descent.nets.MLP"})
    first = copy.deepcopy(net)
    straight, _ = fit(net, opt_cfg, 200, epochs=2, root=mnist_root)

    half, _ = fit(first, opt_cfg, 200, epochs=1, root=mnist_root)
    half.trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (
        len(torch.load(tmp_path / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"][0]["old_dirs"]) == 2
    )
    torch.manual_seed(1)  # another network: everything must come from the checkpoint
    resumed, _ = fit(
        instantiate({"_target_": "descent.nets.MLP"}),
        opt_cfg,
        200,
        epochs=2,
        ckpt_path=tmp_path / "last.ckpt",
        root=mnist_root,
    )
    assert (
        (resumed.updates, resumed.evaluations) == (straight.updates, straight.evaluations) == (6, straight.evaluations)
    )
    for p, q in zip(resumed.net.parameters(), straight.net.parameters()):
        assert torch.equal(p, q)


def problems(*overrides):
    with pytest.raises(ConfigError) as e:
        validate(config(*overrides))
    return str(e.value).splitlines()


def test_lbfgs_refused_online():
    assert problems("optimizer=lbfgs", "batching=online") == [
        "data.batch_size=1 (batching=online): refused with optimizer torch.optim.LBFGS, whose step evaluates its "
        "batch several times through a closure (line search, curvature pairs): allowed are null (batching=full) "
        "or a batch of at least 2 examples (e.g. data.batch_size=10000)"
    ]
    validate(config("optimizer=lbfgs", "batching=full"))
    validate(config("optimizer=lbfgs", "data.batch_size=2"))


def test_muon_parameter_groups_checked():
    validate(config("optimizer=muon"))
    assert problems(
        "optimizer=muon",
        "optimizer.muon_params=[0.weight,0.bias,2.weight]",
        "optimizer.adamw_params=[2.weight,x]",
        "optimizer.adamw.lr=-1",
    ) == [
        "optimizer.adamw.lr=-1: must be a finite number > 0",
        "optimizer.muon_params=['0.weight', '0.bias', '2.weight'] names 0.bias (shape [512]): muon takes 2-D weight "
        "matrices only; name it in another group",
        "optimizer.muon_params, optimizer.adamw_params: parameter 2.weight (shape [10, 512]) is named by muon_params "
        "and adamw_params; each parameter must be named by exactly one",
        "optimizer.muon_params, optimizer.adamw_params: parameter 2.bias (shape [10]) is named by none of them; each "
        "parameter must be named by exactly one",
        "optimizer.adamw_params=['2.weight', 'x']: 'x' names no parameter of the model (its parameters: 0.weight, "
        "0.bias, 2.weight, 2.bias)",
    ]

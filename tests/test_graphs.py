"""The graph path (descent/engine/graphs.py): the same updates as the plain loop, through resume and faults.

Without CUDA the graph path's step runs uncaptured (trainer.cuda_graphs=true on CPU) with the same static
buffers, warm-up and state reset; those tests prove the bookkeeping. Capturing and replaying are proven
only by the tests marked `cuda`, which run where CUDA is present and are skipped elsewhere.
"""

import copy

import pytest
import torch
from mlflow import MlflowClient
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT, Stop, StopAfterChunks, lightning_fit, plain_fit, train
from descent.engine import graphs
from descent.config import ConfigError, validate
from descent.data import IDXDataModule
from descent.engine.loop import Classifier, Diverged
from descent.nets import MLP

N, EPOCHS, SEED = 600, 2, 7
OPTIMIZERS = ("sgd", "sgd_momentum", "nesterov", "rmsprop", "adam")
BATCHES = {"online": 1, "mini": 128, "full": None}


def cuda(test):
    """Only where CUDA is (capture and replay exist only there); the one skip CI allows (conftest.py)."""
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: capture and replay exist only there")(
            test
        )
    )


def optimizer(name, **overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        extra = [f"optimizer.{k}={v}" for k, v in overrides.items()]
        return instantiate(compose("train", overrides=[f"optimizer={name}", *extra]).optimizer)


def fit(root, opt_name, batching, cuda_graphs, accelerator="cpu", ckpt=None, callbacks=(), lr=None):
    torch.manual_seed(0)
    dm = IDXDataModule(root=str(root), limit_train=N, batch_size=BATCHES[batching], chunk_size=256, seed=SEED)
    module = Classifier(
        net=MLP(),
        optimizer=optimizer(opt_name, **({"lr": lr} if lr else {})),
        log_every_examples=100,
        cuda_graphs=cuda_graphs,
    )
    return lightning_fit(module, dm, EPOCHS, accelerator, ckpt, callbacks)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_max_updates_ends_the_run_at_that_update(mnist_root, graph):
    # trainer.max_updates is lightning's max_steps, which lightning checks between chunks: the loop itself
    # must end the run at that update (37 lies inside the first 256-example chunk's 25 updates + the second's)
    dm = IDXDataModule(root=str(mnist_root), limit_train=N, batch_size=10, chunk_size=256, seed=SEED)
    module = Classifier(net=MLP(), optimizer=optimizer("sgd"), log_every_examples=100, cuda_graphs=graph)
    lightning_fit(module, dm, EPOCHS, max_steps=37)
    assert (module.updates, module.examples, module.trainer.global_step) == (37, 370, 37)


def plain(dm, opt_name, batching, device="cpu"):
    torch.manual_seed(0)
    net = MLP().to(device)
    initial = copy.deepcopy(net)
    bs = BATCHES[batching] or N
    plain_fit(net, optimizer(opt_name), dm, batch_size=bs, epochs=EPOCHS, seed=SEED)
    return net, initial


def assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


# -- CPU: the graph path's step, uncaptured --------------------------------------------------------

CASES = [(o, "mini") for o in OPTIMIZERS] + [
    (o, b) for o in ("sgd_momentum", "rmsprop", "adam") for b in ("online", "full")
]


@pytest.mark.parametrize("opt_name,batching", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_graph_step_matches_plain_loop(mnist_root, opt_name, batching):
    module, dm = fit(mnist_root, opt_name, batching, cuda_graphs=True)
    assert module.graph is not None and not module.graph.capture
    bs = BATCHES[batching] or N
    assert set(module.graph.index) == {bs} | ({N % bs} if N % bs else set())  # the last partial batch: its own
    reference, initial = plain(dm, opt_name, batching)
    assert module.updates == EPOCHS * -(-N // bs)
    assert not torch.allclose(next(reference.parameters()), next(initial.parameters()), atol=1e-4)
    assert_same_weights(module.net, reference)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_warm_up_leaves_no_trace_on_a_resumed_optimizer(opt_name):
    torch.manual_seed(0)
    net, x, y = MLP(), torch.rand(64, 784), torch.randint(0, 10, (64,))
    opt = optimizer(opt_name)(net.parameters())
    for _ in range(2):  # state that a checkpoint would have restored
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    before_net, before_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    step = graphs.GraphStep(net, opt, x, y, capture=False)
    step._prepare(16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before_net[k]), k
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(before_opt["state"][i][k])), (i, k)
    assert step.window.state() == {"loss_sum": 0.0, "correct": 0, "n": 0}
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "batching,chunks,first_mode",
    [
        ("mini", 2, True),  # mid-epoch (example 512 of 600)
        ("mini", 3, True),  # at the epoch's end
        ("full", 1, True),  # inside the full batch (example 256 of 600): nothing half-accumulated to carry
        ("full", 1, False),  # an eager checkpoint with half a batch's gradient, resumed on the graph path
    ],
    ids=["mini-mid-epoch", "mini-epoch-end", "full-mid-batch", "full-mid-batch-from-eager"],
)
def test_resume_on_the_graph_path_gives_the_uninterrupted_run(mnist_root, tmp_path, batching, chunks, first_mode):
    whole, _ = fit(mnist_root, "rmsprop", batching, cuda_graphs=True)
    ckpt = tmp_path / "stop.ckpt"
    with pytest.raises(Stop):
        fit(mnist_root, "rmsprop", batching, cuda_graphs=first_mode, callbacks=[StopAfterChunks(chunks, ckpt)])
    state = torch.load(ckpt, weights_only=False)
    if first_mode:  # a graph-path checkpoint never holds a half-accumulated gradient
        assert state["descent"]["grads"] is None
    resumed, _ = fit(mnist_root, "rmsprop", batching, cuda_graphs=True, ckpt=str(ckpt))
    assert (resumed.examples, resumed.updates) == (whole.examples, whole.updates)
    assert_same_weights(resumed.net, whole.net, rtol=1e-6, atol=1e-7)


def test_divergence_is_detected_on_the_graph_path(mnist_root):
    with pytest.raises(Diverged, match="train/loss became (nan|inf)"):
        fit(mnist_root, "sgd", "mini", cuda_graphs=True, lr=1e20)


def test_capturable_only_where_the_optimizer_has_it_and_graphs_are_wanted_by_default_only_on_cuda():
    for name, has_flag in [
        ("sgd", False),
        ("sgd_momentum", False),
        ("nesterov", False),
        ("rmsprop", True),
        ("adam", True),
    ]:
        make = optimizer(name)
        assert graphs.optimizer_kwargs(make, capture=True) == ({"capturable": True} if has_flag else {}), name
        assert graphs.optimizer_kwargs(make, capture=False) == {}, name
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [graphs.wanted(s, cpu) for s in ("auto", True, False)] == [False, True, False]
    assert [graphs.wanted(s, gpu) for s in ("auto", True, False)] == [True, True, False]


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_a_graph_runs_optimizer_state_resumes_on_cpu(name):
    """A GPU graph run's checkpoint says capturable=True in its param groups; on CPU that must not stick."""
    torch.manual_seed(0)
    net, x, y = MLP(), torch.rand(8, 784), torch.randint(0, 10, (8,))
    opt = optimizer(name)(net.parameters())
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["capturable"] = True
    opt = optimizer(name)(net.parameters())
    opt.load_state_dict(saved)
    assert all(g["capturable"] for g in opt.param_groups)  # what torch does: the checkpoint's flags win
    graphs.match_capturable(opt, False)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()  # RMSprop and Adam refuse capturable=True on CPU parameters


def test_cuda_graphs_setting_is_validated():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.cuda_graphs=maybe"])
        default = compose("train").trainer.cuda_graphs
    assert default == "auto"
    with pytest.raises(ConfigError, match=r"trainer.cuda_graphs='maybe': must be auto, true or false"):
        validate(cfg)


def test_entry_point_runs_the_graph_path_uncaptured_on_cpu(tmp_path, store, mnist_root):
    proc = train(
        "trainer.cuda_graphs=true",
        "data.limit_train=1000",
        "trainer.max_epochs=1",
        "logger.log_checkpoint=false",
        cwd=tmp_path,
        store=store,
    )
    assert "updates through descent.engine.graphs.GraphStep (uncaptured: cpu)" in proc.stdout + proc.stderr
    [run] = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("descent").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["progress/updates"] == -(-1000 // 128)


# -- CUDA: capture and replay ------------------------------------------------------------------------

GPU_CASES = [(o, b) for o in OPTIMIZERS for b in BATCHES]


@cuda
@pytest.mark.parametrize("opt_name,batching", GPU_CASES, ids=[f"{o}-{b}" for o, b in GPU_CASES])
def test_captured_path_matches_plain_loop_on_cuda(mnist_root, opt_name, batching):
    module, dm = fit(mnist_root, opt_name, batching, cuda_graphs="auto", accelerator="gpu")
    assert module.graph is not None and module.graph.capture
    bs = BATCHES[batching] or N
    assert set(module.graph.graphs) == {bs} | ({N % bs} if N % bs else set())
    reference, _ = plain(dm, opt_name, batching, device=dm.x_train.device)
    assert module.updates == EPOCHS * -(-N // bs)
    # float tolerance: GPU reductions need not sum in the same order in both loops
    assert_same_weights(module.net, reference, rtol=1e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("opt_name", ["rmsprop", "adam", "sgd_momentum"])
def test_capturable_state_checkpoints_and_resumes_on_cuda(mnist_root, tmp_path, opt_name):
    whole, _ = fit(mnist_root, opt_name, "mini", cuda_graphs=True, accelerator="gpu")
    ckpt = tmp_path / "stop.ckpt"
    with pytest.raises(Stop):  # one chunk per epoch on the captured path: this is epoch 0's end
        fit(mnist_root, opt_name, "mini", cuda_graphs=True, accelerator="gpu", callbacks=[StopAfterChunks(1, ckpt)])
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    for s in state["optimizer_states"][0]["state"].values():
        assert "step" not in s or s["step"].dtype == torch.float32  # capturable: step kept as a device tensor
    resumed, _ = fit(mnist_root, opt_name, "mini", cuda_graphs=True, accelerator="gpu", ckpt=str(ckpt))
    assert resumed.updates == whole.updates
    assert_same_weights(resumed.net, whole.net, rtol=1e-5, atol=1e-6)


@cuda
def test_replays_between_log_points_never_wait_for_the_gpu():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = MLP().to(dev)
    x, y = torch.rand(1000, 784, device=dev), torch.randint(0, 10, (1000,), device=dev)
    opt = optimizer("rmsprop")(net.parameters(), capturable=True)
    step = graphs.GraphStep(net, opt, x, y, capture=True)
    step.start_epoch(torch.randperm(1000, device=dev), step.window)
    step.update(0, 100)  # captures
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in range(100, 1000, 100):
            step.update(a, a + 100)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss, acc = step.window.pop()
    assert step.window.n == 0 and 0 < loss < 10 and 0 <= acc <= 1

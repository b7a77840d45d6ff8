"""Several targets in one run and data.drop_last: the first crossing of each val accuracy is logged once,
also by a run stopped (a real SIGTERM at a chunk boundary) and resumed between two targets; a partial last
batch is absent under drop_last. Real MNIST subsets, real subprocesses, a real MLflow store."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from mlflow import MlflowClient

from conftest import lightning_fit, train
from descent.data import IDXDataModule
from descent.engine.loop import Classifier
from descent.nets import MLP
from descent.tracking.names import target_key
from test_resume import stop_at


def test_a_partial_last_batch_is_absent_under_drop_last(mnist_root):
    seen = []  # the size of every batch an update was taken on

    class Recording(Classifier):
        def _after_update(self, examples, updates, epoch_pos, batch_len):
            seen.append(batch_len)
            return super()._after_update(examples, updates, epoch_pos, batch_len)

    for drop_last in (False, True):
        seen.clear()
        dm = IDXDataModule(
            root=str(mnist_root), download=False, limit_train=1000, batch_size=300, seed=0, drop_last=drop_last
        )
        module = Recording(MLP(hidden=[32]), optimizer=partial(torch.optim.SGD, lr=0.1), log_every_examples=300)
        lightning_fit(module, dm, epochs=2)
        if drop_last:  # 3 whole batches per epoch; the 100 examples left over are another 100 each epoch
            assert seen == [300] * 6 and (module.updates, module.examples) == (6, 1800)
            assert module.latest["progress/epoch"] == 2.0
        else:
            assert seen == [300, 300, 300, 100] * 2 and (module.updates, module.examples) == (8, 2000)


SMALL = [
    "optimizer=rmsprop",
    "data.limit_train=2000",
    "data.val_size=1000",
    "data.batch_size=64",
    "data.drop_last=true",
    "data.chunk_size=128",
    "trainer.val_every_examples=128",
    "trainer.max_epochs=1",
    "trainer.noise_scale=false",
    "sweep.objective=target/updates",
]


def test_each_target_is_logged_once_also_by_a_run_stopped_and_resumed_between_two(tmp_path, store, mnist_root):
    # the run left alone, to an unreachable target: where val/acc first crosses each value
    (tmp_path / "alone").mkdir()
    train(*SMALL, "sweep.target_acc=0.999", cwd=tmp_path / "alone", store=store)
    client = MlflowClient(store)
    alone = (tmp_path / "alone/outputs/run/mlflow_run_id").read_text()
    acc = [(m.step, m.value) for m in client.get_metric_history(alone, "val/acc")]
    assert [s for s, _ in acc] == [128 * k for k in range(1, 16)] + [1984]  # whole batches only: 31 x 64
    first = lambda a: next(s for s, v in acc if v >= a)
    # two targets first crossed at least three points apart, the first one never lost again
    low = next(v for i, (s, v) in enumerate(acc) if s >= 256 and all(w >= v for _, w in acc[i:]))
    high = next(v for s, v in acc if s >= first(low) + 3 * 128 and v > low)
    stop = first(low) + 128  # a chunk boundary after the first crossing, before the second
    assert first(low) < stop < first(high)

    overrides = [*SMALL, f"sweep.targets=[{low}]", f"sweep.target_acc={high}"]
    proc = stop_at(tmp_path, store, overrides, {"DESCENT_STOP_AT": str(stop), "DESCENT_STOP_SIGNALS": "SIGTERM"})
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    run_id = (tmp_path / "outputs/run/mlflow_run_id").read_text()
    train(f"resume={run_id}", cwd=tmp_path, store=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for a in (low, high):
        for what in ("updates", "examples", "seconds"):
            history = client.get_metric_history(run_id, target_key(what, a))
            assert len(history) == 1, (a, what, history)  # once, though the run started twice
            assert history[0].step == first(a)
        assert client.get_metric_history(run_id, target_key("updates", a))[0].value == first(a) // 64
    assert run.data.metrics["target/updates"] == first(high) // 64 and run.data.metrics["target/examples"] == first(
        high
    )
    steps = [m.step for m in client.get_metric_history(run_id, "val/acc")]
    assert steps[-1] == first(high) and math.isclose(run.data.metrics["val/acc"], dict(acc)[first(high)])


def test_a_target_above_the_one_the_run_stops_at_is_refused_before_anything_runs(tmp_path, store):
    proc = train(
        "sweep.objective=target/updates",
        "sweep.target_acc=0.97",
        "sweep.targets=[0.95,0.99]",
        cwd=tmp_path,
        store=store,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sweep.targets=[0.95, 0.99]: each must be <= sweep.target_acc=0.97" in proc.stdout + proc.stderr
    assert MlflowClient(store).search_runs([e.experiment_id for e in MlflowClient(store).search_experiments()]) == []


def test_a_trial_the_study_tells_to_stop_earlier_says_so_in_its_config():
    import optuna
    from omegaconf import OmegaConf

    from descent.sweep.job import stop_where_the_study_says

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    seed_run, search = study.ask(), study.ask()
    seed_run.set_user_attr("descent.stop", 0.96)  # what the protocol tells a seed run of a rate chosen for 0.96
    search.set_user_attr("descent.stop", 0.99)  # a stop above the run's highest target changes nothing
    for trial, expected in ((seed_run, 0.96), (search, 0.98), (None, 0.98)):
        cfg = OmegaConf.create({"sweep": {"target_acc": 0.98, "targets": [0.95, 0.96, 0.97]}})
        OmegaConf.set_struct(cfg, True)
        stop_where_the_study_says(cfg, trial)
        assert cfg.sweep.target_acc == expected


def test_a_search_trial_that_misses_its_deadline_is_pruned_and_a_measurement_never_is():
    """descent.bound (the protocol's deadline from the next smaller batch size) prunes a search trial that has not
    reached that target after so many updates; a reached target's deadline no longer counts, and a seed run
    (descent.prune false) is never pruned. The module is a stand-in with the attributes the hook reads."""
    from types import SimpleNamespace

    import optuna

    from descent.sweep.job import Pruned, Target

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    module = SimpleNamespace(updates=0, train_seconds=0.0, record=lambda metrics: None)
    search = study.ask()
    search.set_user_attr("descent.bound", {"0.95": 200.0})
    target = Target(module, 0.98, search, targets=[0.95, 0.97])
    assert target.deadlines() == [(0.95, 200.0)]
    module.updates = 199
    target(199 * 128, {"val/acc": 0.9})  # before its deadline: goes on
    module.updates = 200
    with pytest.raises(Pruned, match="200 updates without val/acc >= 0.95, its deadline"):
        target(200 * 128, {"val/acc": 0.9})
    reached = Target(module, 0.98, search, targets=[0.95, 0.97])
    reached(200 * 128, {"val/acc": 0.955})  # reached 0.95 at that point: no deadline is left
    assert reached.deadlines() == [] and reached.crossed == [0.95]
    module.updates = 10**6
    reached(10**6 * 128, {"val/acc": 0.96})  # no study best yet at 0.97 or 0.98: nothing prunes it
    seed_run = study.ask()
    seed_run.set_user_attr("descent.prune", False)
    seed_run.set_user_attr("descent.bound", {"0.95": 200.0})
    Target(module, 0.98, seed_run, targets=[0.95, 0.97])(10**6 * 128, {"val/acc": 0.9})

"""The real entry point end to end, checked through MlflowClient on a real sqlite store."""

import os

import yaml
from mlflow import MlflowClient

from conftest import train
from descent.engine import threads


def runs(store, experiment="descent"):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_run_records_params_metrics_and_artifacts(tmp_path, store, mnist_root):
    train(
        "data.limit_train=3000",
        "data.val_size=1000",
        "trainer.max_epochs=2",
        "trainer.val_every_examples=2000",
        cwd=tmp_path,
        store=store,
    )
    client, [run] = runs(store)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "rmsprop-mini-s0"

    params = run.data.params
    assert {k: params[k] for k in ("optimizer", "batching", "model", "data")} == {
        "optimizer": "rmsprop",
        "batching": "mini",
        "model": "mlp",
        "data": "mnist",
    }
    assert params["optimizer.lr"] == "0.001" and params["data.limit_train"] == "3000"
    assert params["trainer.max_epochs"] == "2" and params["seed"] == "0"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    # the thread policy's choice for batch 128 on this machine, and OpenMP's spin set before torch loaded
    # (unless this environment has a wait policy of its own, which the run keeps)
    assert params["torch.threads"] == str(threads.choose(128, threads.cpus_granted()))
    env = os.environ if "OMP_WAIT_POLICY" in os.environ else {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT), **os.environ}
    assert params["omp.wait_policy"] == threads.wait_policy(env)

    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "progress/epoch",
        "progress/updates",
        "progress/seconds",
    ):
        assert key in metrics, key
    assert metrics["progress/epoch"] == 2.0
    assert metrics["progress/updates"] == 2 * 24  # ceil(3000 / 128) updates per epoch
    assert 0.8 < metrics["test/acc"] <= 1.0
    assert "system/cpu_utilization_percentage" in metrics  # system metrics are on by default

    # step = training examples seen, for every metric
    hist = {
        k: client.get_metric_history(run.info.run_id, k)
        for k in ("train/loss", "val/loss", "test/acc", "progress/updates")
    }
    steps = [m.step for m in hist["train/loss"]]
    assert steps == sorted(steps) and steps[-1] == 6000
    assert all(b - a <= 1200 + 128 for a, b in zip([0] + steps, steps))  # a point at least every 1200 examples
    assert [m.step for m in hist["val/loss"]] == [
        2048,
        3000,
        4024,
        6000,
    ]  # first update at or after every 2000 examples, and epoch ends
    assert [m.step for m in hist["test/acc"]] == [6000]
    updates = {m.step: m.value for m in hist["progress/updates"]}
    assert all(updates[s] == -(-min(s, 3000) // 128) + (s > 3000) * -(-(s - 3000) // 128) for s in steps)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "train_image_4.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.ckpt"]
    config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))))
    assert config["data"]["limit_train"] == 3000 and config["optimizer"]["_target_"] == "torch.optim.RMSprop"
    png = client.download_artifacts(run.info.run_id, "train_image_4.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_upload_and_system_metrics_can_be_switched_off(tmp_path, store, mnist_root):
    train(
        "data.limit_train=1000",
        "trainer.max_epochs=1",
        "logger.log_checkpoint=false",
        "trainer.threads=1",
        "logger.system_metrics=false",
        cwd=tmp_path,
        store=store,
    )
    client, [run] = runs(store)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    assert run.data.params["torch.threads"] == "1"  # trainer.threads overrides the policy (2 for batch 128 here)
    assert "checkpoints" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt").exists()  # still saved locally


def test_multirun_records_one_run_per_job(tmp_path, store, mnist_root):
    train(
        "optimizer=sgd,sgd_momentum,rmsprop",
        "data.limit_train=1000",
        "trainer.max_epochs=1",
        "logger.log_checkpoint=false",
        cwd=tmp_path,
        store=store,
        multirun=True,
    )
    client, found = runs(store)
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags or r.data.params.get("optimizer")]
    assert sorted(r.info.run_name for r in children) == ["rmsprop-mini-s0", "sgd-mini-s0", "sgd_momentum-mini-s0"]
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in children)
    assert {r.data.tags["hydra.job.num"] for r in children} == {"0", "1", "2"}

"""What a finished run carries for MLflow's columns: the model, the datasets, system metrics; and the progress line."""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import DATA, train


def finished_runs(store):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("descent")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    return client, [r for r in runs if "test/acc" in r.data.metrics]  # the jobs, not a sweep's parent


@pytest.fixture(scope="module")
def seed_like(tmp_path_factory, mnist_root):
    """A seed run on small data, with the progress bar on (it logs lines: the output is not a terminal)."""
    tmp = tmp_path_factory.mktemp("seed")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = train("data.limit_train=2000", "data.val_size=1000", "trainer.max_epochs=1", "trainer.progress_bar=true",
                 "logger.register_model=mnist-mlp", cwd=tmp, store=store,
                 env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    client, [run] = finished_runs(store)
    return store, client, run, proc.stdout + proc.stderr


def test_model_reproduces_the_runs_test_accuracy(seed_like):
    from descent.data import load_split

    store, client, run, _ = seed_like
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    (inp,), (out,) = model.metadata.get_input_schema().inputs, model.metadata.get_output_schema().inputs
    assert (inp.type, inp.shape, out.type, out.shape) == (np.dtype("float32"), (-1, 784), np.dtype("float32"), (-1, 10))

    x, y = load_split(DATA, train=False)  # the 10000 test images, float32 in [0, 1]
    scores = model.predict(x.numpy())
    acc = float((scores.argmax(1) == y.numpy()).mean())
    # the same weights on the same images; summation order may differ from the run's chunks by float rounding
    assert abs(acc - run.data.metrics["test/acc"]) <= 1 / len(y), (acc, run.data.metrics["test/acc"])

    [version] = client.search_model_versions("name = 'mnist-mlp'")  # logger.register_model=mnist-mlp
    assert version.run_id == run.info.run_id


def test_datasets_are_run_inputs_with_context_shape_and_digest(seed_like, mnist_root):
    from descent.data import MNISTDataModule
    from descent.record import digest

    store, client, run, _ = seed_like
    inputs = {tag.value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs
              for tag in i.tags if tag.key == "mlflow.data.context"}
    assert {c: d.name for c, d in inputs.items()} == {
        "train": "mnist (train, 2000×784)", "validation": "mnist (validation, 1000×784)",
        "test": "mnist (test, 10000×784)"}
    assert all(d.source_type == "local" and "MNIST/raw" in d.source for d in inputs.values())
    assert '"shape": [-1, 784]' in inputs["train"].schema.replace('\\"', '"')

    # the digest is of the exact tensors: rebuilt here, they give the same one; other data, another one
    dm = MNISTDataModule(root=str(DATA), val_size=1000, limit_train=2000)
    dm.setup()
    assert inputs["train"].digest == digest(dm.x_train, dm.y_train)
    assert inputs["validation"].digest == digest(dm.x_val, dm.y_val)
    assert inputs["test"].digest == digest(dm.x_test, dm.y_test)
    assert digest(dm.x_train[:1999], dm.y_train[:1999]) != inputs["train"].digest
    flipped = dm.y_train.clone()
    flipped[0] = (flipped[0] + 1) % 10
    assert digest(dm.x_train, flipped) != inputs["train"].digest


def test_system_metrics_and_progress_line(seed_like):
    store, client, run, output = seed_like
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    # without a terminal the bar is one log line per epoch end (and every 30 s): examples, rate, loss
    assert "rmsprop-mini-s0 epoch 1/1: 2000/2000 examples (100%)" in output
    assert "examples/s" in output and "train/loss" in output
    assert "\r" not in output  # no redrawn bar in a log


def test_two_runs_on_the_same_data_share_digests(tmp_path, store, mnist_root):
    train("optimizer=sgd,rmsprop", "data.limit_train=1000", "trainer.max_epochs=1", "logger.system_metrics=false",
          cwd=tmp_path, store=store, multirun=True)
    client, runs = finished_runs(store)
    assert len(runs) == 2
    digests = [{i.dataset.name: i.dataset.digest for i in client.get_run(r.info.run_id).inputs.dataset_inputs}
               for r in runs]
    assert digests[0] == digests[1] and set(digests[0]) == {"mnist (train, 1000×784)", "mnist (test, 10000×784)"}
    assert not any(k.startswith("system/") for r in runs for k in r.data.metrics)  # logger.system_metrics=false

    # the sweep's report names its folder as launched (relative), not as this machine's absolute path
    report = (tmp_path / "outputs" / "sweep" / "convergence.md").read_text()
    assert "(outputs/sweep)" in report and str(tmp_path) not in report

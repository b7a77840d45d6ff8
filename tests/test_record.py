"""What a finished run carries for MLflow's columns: the model, the datasets, system metrics; and the progress line.

All on `small_sweep` (conftest.py): two seed-like runs (sgd, rmsprop) on 2000 training images, 1 epoch.
"""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import DATA


@pytest.fixture(scope="module")
def runs(small_sweep):
    """{run name: run} of the sweep's two jobs, and the client."""
    _, store, _ = small_sweep
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("descent")
    found = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return client, {r.info.run_name: r for r in found if "test/acc" in r.data.metrics}


def test_model_reproduces_the_runs_test_accuracy(small_sweep, runs):
    from descent.data import load_split

    client, by_name = runs
    run = by_name["rmsprop-mini-s0"]
    mlflow.set_tracking_uri(small_sweep[1])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    (inp,), (out,) = model.metadata.get_input_schema().inputs, model.metadata.get_output_schema().inputs
    assert (inp.type, inp.shape, out.type, out.shape) == (np.dtype("float32"), (-1, 784), np.dtype("float32"), (-1, 10))

    x, y = load_split(DATA, train=False)  # the 10000 test images, float32 in [0, 1]
    scores = model.predict(x.numpy())
    acc = float((scores.argmax(1) == y.numpy()).mean())
    # the same weights on the same images; the run summed in other chunks, so allow one image of float rounding
    assert abs(acc - run.data.metrics["test/acc"]) <= 1 / len(y), (acc, run.data.metrics["test/acc"])

    # logger.register_model=mnist-mlp: one version per run of the sweep
    versions = client.search_model_versions("name = 'mnist-mlp'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in by_name.values()}


def test_datasets_are_run_inputs_with_context_shape_and_digest(runs):
    from descent.data import IDXDataModule
    from descent.record import digest

    client, by_name = runs
    inputs = {name: {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags
                     if t.key == "mlflow.data.context"} for name, run in by_name.items()}
    sgd, rmsprop = inputs["sgd-mini-s0"], inputs["rmsprop-mini-s0"]
    assert {c: d.name for c, d in rmsprop.items()} == {
        "train": "mnist (train, 2000×784)", "validation": "mnist (validation, 1000×784)",
        "test": "mnist (test, 10000×784)"}
    assert all(d.source_type == "local" and "MNIST/raw" in d.source for d in rmsprop.values())
    assert '"shape": [-1, 784]' in rmsprop["train"].schema.replace('\\"', '"')
    # the same data in two runs: the same digests
    assert {c: d.digest for c, d in sgd.items()} == {c: d.digest for c, d in rmsprop.items()}

    # the digest is of the exact tensors: rebuilt here, they give the same one; other data, another one
    dm = IDXDataModule(root=str(DATA), val_size=1000, limit_train=2000)
    dm.setup()
    assert rmsprop["train"].digest == digest(dm.x_train, dm.y_train)
    assert rmsprop["validation"].digest == digest(dm.x_val, dm.y_val)
    assert rmsprop["test"].digest == digest(dm.x_test, dm.y_test)
    assert digest(dm.x_train[:1999], dm.y_train[:1999]) != rmsprop["train"].digest
    flipped = dm.y_train.clone()
    flipped[0] = (flipped[0] + 1) % 10
    assert digest(dm.x_train, flipped) != rmsprop["train"].digest


def test_system_metrics_progress_lines_and_report_paths(small_sweep, runs):
    launch_dir, _, output = small_sweep
    _, by_name = runs
    for run in by_name.values():
        system = {k for k in run.data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    # without a terminal the bar is a log line per epoch end (and every 30 s): examples, rate, loss
    for name in by_name:
        assert f"{name} epoch 1/1: 2000/2000 examples (100%)" in output
    assert "examples/s" in output and ", loss " in output
    assert "\r" not in output  # no redrawn bar in a log
    # the sweep's report names its folder as launched (relative), not as this machine's absolute path
    report = (launch_dir / "outputs" / "sweep" / "convergence.md").read_text()
    assert "(outputs/sweep)" in report and str(launch_dir) not in report

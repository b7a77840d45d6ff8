"""What a finished run carries for MLflow's columns: the model, the datasets, system metrics, best/* beside the last
values; and the progress line. What a sweep's runs say of themselves: descriptions, the report as a table, the
best job's model under the alias `best`.

All on `small_sweep` (conftest.py): two seed-like runs (sgd, rmsprop) on 2000 training images, 1 epoch.
"""

from pathlib import Path

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
    from descent.tracking.record import digest

    client, by_name = runs
    inputs = {
        name: {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
        for name, run in by_name.items()
    }
    sgd, rmsprop = inputs["sgd-mini-s0"], inputs["rmsprop-mini-s0"]
    assert {c: d.name for c, d in rmsprop.items()} == {
        "train": "mnist (train, 2000×784)",
        "validation": "mnist (validation, 1000×784)",
        "test": "mnist (test, 10000×784)",
    }
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


def staircase(history):
    """The points of a metric's history that improve on every earlier one: what best/* logs."""
    steps, best = [], None
    for m in sorted(history, key=lambda m: m.step):
        if best is None or m.value < best:
            best = m.value
            steps.append((m.step, m.value))
    return steps


def test_best_values_are_the_extremes_of_the_logged_history_at_their_steps(runs):
    client, by_name = runs
    for run in by_name.values():
        rid = run.info.run_id
        loss, acc = client.get_metric_history(rid, "val/loss"), client.get_metric_history(rid, "val/acc")
        assert len(loss) >= 4  # trainer.val_every_examples=500 over 2000 examples
        assert run.data.metrics["best/val_loss"] == min(m.value for m in loss)
        assert run.data.metrics["best/val_acc"] == max(m.value for m in acc)
        logged = [
            (m.step, m.value) for m in sorted(client.get_metric_history(rid, "best/val_loss"), key=lambda m: m.step)
        ]
        assert logged == staircase(loss), run.info.run_name
        negated = [type(m)(m.key, -m.value, m.timestamp, m.step) for m in acc]
        logged = [
            (m.step, -m.value) for m in sorted(client.get_metric_history(rid, "best/val_acc"), key=lambda m: m.step)
        ]
        assert logged == staircase(negated), run.info.run_name
        assert "best/train_loss" not in run.data.metrics  # with validation data, its best is what counts


def test_the_sweeps_parent_and_jobs_describe_themselves_and_the_report_is_a_table(small_sweep, runs):
    client, by_name = runs
    _, store, _ = small_sweep
    [parent] = client.search_runs(
        [client.get_experiment_by_name("descent").experiment_id], "tags.`descent.sweep` = 'true'"
    )
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("A sweep over `optimizer`.")
    command = note.split("Command: `", 1)[1].split("`", 1)[0]
    assert command.startswith("python ") and " -m " in command and " optimizer=sgd,rmsprop " in command
    report = (Path(parent.data.tags["hydra.sweep.dir"]) / "convergence.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "\n".join(table) in note  # header, rule, two configurations
    best = min(by_name.values(), key=lambda r: r.data.metrics["val/loss"])
    assert f"Best run (minimize val/loss): {best.info.run_name}" in note and "models:/mnist-mlp@best" in note
    for name, run in by_name.items():
        optimizer = run.data.params["optimizer"]
        assert run.data.tags["mlflow.note.content"].startswith(
            f"Job {run.data.tags['hydra.job.num']} of the sweep {parent.info.run_name}: optimizer={optimizer} "
        )
    # the report's table as an MLflow table on the parent: one row per configuration, the same numbers
    mlflow.set_tracking_uri(store)  # load_table searches runs through the global store
    rows = client.load_table(parent.info.experiment_id, "report/convergence.json", run_ids=[parent.info.run_id])
    assert sorted(rows["configuration"]) == ["rmsprop-mini", "sgd-mini"]
    for _, row in rows.iterrows():
        [run] = [r for r in by_name.values() if row["configuration"].startswith(r.data.params["optimizer"] + "-")]
        assert row["val_loss_mean"] == pytest.approx(run.data.metrics["val/loss"], rel=1e-9)


def test_the_alias_best_loads_the_model_of_the_job_with_the_best_objective(small_sweep, runs):
    import torch
    import torch.nn.functional as F

    from descent.data import IDXDataModule

    client, by_name = runs
    best = min(by_name.values(), key=lambda r: r.data.metrics["val/loss"])  # sweep.objective: val/loss, minimized
    version = client.get_model_version_by_alias("mnist-mlp", "best")
    assert version.run_id == best.info.run_id
    mlflow.set_tracking_uri(small_sweep[1])
    model = mlflow.pyfunc.load_model("models:/mnist-mlp@best")
    dm = IDXDataModule(root=str(DATA), val_size=1000, limit_train=2000)
    dm.setup()
    scores = torch.from_numpy(model.predict(dm.x_val.numpy()))
    loss = float(F.cross_entropy(scores, dm.y_val))
    assert loss == pytest.approx(best.data.metrics["val/loss"], rel=1e-4)  # that job's model, on its validation data
    other = max(by_name.values(), key=lambda r: r.data.metrics["val/loss"])
    assert abs(loss - other.data.metrics["val/loss"]) > 1e-3


@pytest.mark.parametrize("preset", ["gd_vs_sgd", "optimizers", "lr_search"])
def test_a_presets_sweep_states_its_question_and_what_it_varies(preset):
    """The parent's description opens with the preset's question: its opening comment (real Hydra composition)."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from descent.sweep.notes import parent_note, swept_keys

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    comment = (ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text().split("\n#\n")[0]
    first = comment.splitlines()[1].lstrip("# ")  # the line after "# @package _global_"
    keys = swept_keys(cfg)
    assert keys and set(keys) <= set(cfg.hydra.sweeper.params)
    note = parent_note(cfg, keys, ["src/train.py", "-m", f"experiment={preset}"])
    assert note.startswith(f"**{first}") and f"Command: `python src/train.py -m experiment={preset}`" in note
    assert "Its jobs vary " + ", ".join(f"`{k}`" for k in keys) in note

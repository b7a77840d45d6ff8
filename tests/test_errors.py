"""What the model gets wrong (logger.log_errors=true: descent/reports/errors.py) on a seed-style run, best/train_loss
without validation data, the experiment's kind; and the misclassified grid on data of another shape."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import train
from test_record import staircase


@pytest.fixture(scope="module")
def seed_style(tmp_path_factory, mnist_root):
    """The seed run (no validation data) on 300 training images, 1 epoch, with logger.log_errors=true; a train
    point every 50 examples (not 1200: 300 examples would have one, and best/train_loss needs a history)."""
    from conftest import sqlite_store

    tmp = tmp_path_factory.mktemp("seed_style")
    store = sqlite_store(tmp)
    train(
        "data.limit_train=300",
        "trainer.max_epochs=1",
        "trainer.log_every_examples=50",
        "logger.log_errors=true",
        cwd=tmp,
        store=store,
    )
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    return client, run


def load(client, run, name):
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)  # load_table searches runs through the global store
    return client.load_table(run.info.experiment_id, f"errors/{name}.json", run_ids=[run.info.run_id])


def test_confusion_matrix_per_class_table_and_grid_agree_with_test_acc(seed_style):
    client, run = seed_style
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "errors")}
    assert arts == {
        f"errors/{n}"
        for n in (
            "confusion_matrix.png",
            "confusion_matrix.json",
            "per_class.json",
            "misclassified.png",
            "misclassified.json",
        )
    }
    acc, n = run.data.metrics["test/acc"], 10000
    wrong = round((1 - acc) * n)
    assert 0 < wrong < n  # 300 images, 1 epoch: far from perfect, far from chance

    matrix = load(client, run, "confusion_matrix")
    counts = matrix[[f"predicted {d}" for d in range(10)]].to_numpy()
    assert [str(t) for t in matrix["true"]] == [str(d) for d in range(10)]  # pandas reads "0" back as 0
    assert counts.sum() == n and n - np.trace(counts) == wrong

    per_class = load(client, run, "per_class")
    assert per_class["support"].sum() == n and per_class["errors"].sum() == wrong
    assert list(per_class["recall"]) == pytest.approx(list(np.diag(counts) / counts.sum(1)))
    predicted = counts.sum(0)
    assert list(per_class["precision"]) == pytest.approx(
        [c / p if p else 0.0 for c, p in zip(np.diag(counts), predicted)]
    )
    assert run.data.tags["mlflow.loggedArtifacts"] and "per_class.json" in run.data.tags["mlflow.loggedArtifacts"]

    mistakes = load(client, run, "misclassified")
    assert len(mistakes) == wrong
    assert (mistakes["true"] != mistakes["predicted"]).all()
    assert list(mistakes["confidence"]) == sorted(mistakes["confidence"], reverse=True)  # most confident first
    for name in ("confusion_matrix.png", "misclassified.png"):
        png = client.download_artifacts(run.info.run_id, f"errors/{name}")
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_train_loss_without_validation_data(seed_style):
    client, run = seed_style
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 2
    assert run.data.metrics["best/train_loss"] == min(m.value for m in history)
    logged = sorted(client.get_metric_history(run.info.run_id, "best/train_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in logged] == staircase(history)
    assert not {"best/val_loss", "best/val_acc"} & set(run.data.metrics)


def test_experiments_are_tagged_for_the_runs_table_new_and_old(seed_style, tmp_path):
    from descent.tracking import names, store
    from conftest import sqlite_store

    client, run = seed_style
    assert client.get_experiment(run.info.experiment_id).tags[names.KIND] == "custom_model_development"
    other = MlflowClient(sqlite_store(tmp_path))
    old = other.create_experiment("made-before")  # an experiment from before: no kind
    assert names.KIND not in other.get_experiment(old).tags
    assert store.experiment_id(other, "made-before") == old  # what the next run calls
    assert other.get_experiment(old).tags[names.KIND] == "custom_model_development"
    other.set_experiment_tag(old, names.KIND, "genai_development")  # a user's choice in the UI stays
    store.experiment_id(other, "made-before")
    assert other.get_experiment(old).tags[names.KIND] == "genai_development"


def test_the_grid_takes_its_shape_and_classes_from_the_data(tmp_path):
    """Not 28x28, not 10 classes: 3-channel 12x20 images (channels first) in 4 named classes."""
    import matplotlib

    matplotlib.use("Agg")
    from descent.reports import errors

    class Data:
        image_shape = (3, 12, 20)
        classes = ["cat", "dog", "owl", "eel"]
        x_test = torch.rand(40, 3 * 12 * 20)
        y_test = torch.arange(40) % 4

    logits = torch.zeros(40, 4)
    logits[torch.arange(40), (torch.arange(40) + (torch.arange(40) % 3 == 0)) % 4] = 5.0  # every third is wrong
    found = errors.analyse(torch.softmax(logits, 1), Data.y_test, errors.class_names(Data, 4))
    assert found["matrix"].shape == (4, 4) and len(found["wrong"]["index"]) == 14
    assert set(found["wrong"]["true"]) <= set(Data.classes)
    image = errors.to_image(Data.x_test[0].numpy(), errors.image_shape(Data, Data.x_test))
    assert image.shape == (12, 20, 3)
    fig = errors.misclassified_figure(Data.x_test, found["wrong"], errors.image_shape(Data, Data.x_test), 25, "t")
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    flat = torch.rand(5, 36)  # no shape given: a square from the data's own width
    assert errors.image_shape(object(), flat) == (6, 6)

"""The chapter's notebook (notebooks/chapter2.py, paired with chapter2.ipynb by jupytext): executed as a
reader runs it, cell by cell in the venv's own kernel (nbclient + ipykernel), on small data.

Deviations from the notebook as committed, each for the suite's time: DESCENT_NOTEBOOK_SMALL=1 (2000 training
examples and 2 passes instead of 10000 and 5: the notebook's own switch), and MLFLOW_TRACKING_URI a store in
the test's folder, DESCENT_NOTEBOOK_OUT the test's folder instead of outputs/notebook/ (the notebook's own
switches, as MLFLOW_TRACKING_URI is every descent command's)."""

import os

import pytest
from mlflow import MlflowClient

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "chapter2.py"
PAIRED = ROOT / "notebooks" / "chapter2.ipynb"


def test_the_py_and_the_ipynb_hold_the_same_cells():
    """jupytext pairs them: the .py is what diffs, the .ipynb what the site renders with its outputs."""
    jupytext = pytest.importorskip("jupytext", reason="jupytext is in the docs extra")
    py, nb = jupytext.read(NOTEBOOK), jupytext.read(PAIRED)
    assert [(c.cell_type, c.source) for c in py.cells] == [(c.cell_type, c.source) for c in nb.cells]
    # the committed notebook is the executed one: every code cell ran, in order, and the figures are there
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert (
        sum(
            o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for c in code for o in c.outputs
        )
        == 2
    )


def test_the_notebook_executes_on_small_data(tmp_path):
    jupytext = pytest.importorskip("jupytext", reason="jupytext is in the docs extra")
    from nbclient import NotebookClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    nb = jupytext.read(NOTEBOOK)
    env = {"DESCENT_NOTEBOOK_SMALL": "1", "MLFLOW_TRACKING_URI": store, "DESCENT_NOTEBOOK_OUT": str(tmp_path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        ).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(figures) == 2, "the curves from MLflow and the ball's path"
    assert "test/acc" in text and "rmsprop-mini-s0 FINISHED" in text
    assert "sgd_momentum: ends at w = 1.1" in text  # momentum 0.9 rolls into the global minimum (1.107)
    assert "sgd: ends at w = -0.8" in text  # plain SGD stays in the local one (-0.838)

    # what the notebook read back is in the store it was given, as train.py recorded it
    client = MlflowClient(store)
    [seed] = client.search_runs([client.get_experiment_by_name("notebook-seed").experiment_id])
    assert seed.data.params["data.limit_train"] == "2000" and seed.data.metrics["test/acc"] > 0.8
    gd = client.get_experiment_by_name("notebook-gd-vs-sgd").experiment_id
    children = client.search_runs([gd], "tags.`mlflow.parentRunId` != ''")
    assert sorted(r.data.params["batching"] for r in children) == ["full", "mini", "online"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert (tmp_path / "gd_vs_sgd" / "convergence.md").exists() and (tmp_path / "ball" / "convergence.png").exists()

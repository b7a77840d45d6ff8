"""`resume=<run> key=value`: more epochs extend a run into the same MLflow run; overrides that would change
what the run measures are refused before anything runs.

One FINISHED 1-epoch run (module fixture) serves both tests: the refusals leave it as they find it, and
the extension works from whatever state it is in, so their order does not matter.
"""

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import sqlite_store, train, train_exits

SMALL = ["data.limit_train=300", "trainer.log_every_examples=100", "logger.log_checkpoint=false"]


def history(client, run_id):
    run = client.get_run(run_id)
    return {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
        for k in run.data.metrics
        if not k.startswith("system/")
    }  # the machine's, not the run's


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    cwd = tmp_path_factory.mktemp("finished")
    store = sqlite_store(cwd)
    train(*SMALL, "trainer.max_epochs=1", cwd=cwd, store=store)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("descent").experiment_id])
    return cwd, store, run.info.run_id


def test_more_epochs_continue_a_finished_run_in_the_same_run_as_if_it_had_run_them_at_once(tmp_path, finished):
    cwd, store, run_id = finished
    ref_store = sqlite_store(tmp_path)
    train(*SMALL, "trainer.max_epochs=2", cwd=tmp_path, store=ref_store)
    ref_client = MlflowClient(ref_store)
    [ref] = ref_client.search_runs([ref_client.get_experiment_by_name("descent").experiment_id])
    reference = history(ref_client, ref.info.run_id)

    train(f"resume={run_id}", "trainer.max_epochs=2", cwd=cwd, store=store)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the same MLflow run, no new one"
    extended = history(client, run_id)
    # the steps go on where the first end left them, and the data order is the longer run's: every
    # training point equals the uninterrupted 2-epoch run's (best/train_loss too: it goes on from the first end's)
    for key in ("train/loss", "train/acc", "progress/epoch", "progress/updates", "best/train_loss"):
        assert [s for s, _ in extended[key]] == [s for s, _ in reference[key]], key
        assert [v for _, v in extended[key]] == pytest.approx([v for _, v in reference[key]], rel=1e-5), key
    # the test set is evaluated at each end: the 1-epoch point stays, the 2-epoch one is added at its step
    assert [s for s, _ in extended["test/acc"]] == [300, 600]
    assert extended["test/acc"][-1][1] == pytest.approx(reference["test/acc"][-1][1], rel=1e-5)
    # params are immutable: they keep the start's value; the tag and config.yaml say what runs now, and
    # config.yaml is what the next `resume=<run>` (the printed command) reads
    assert run.data.params["trainer.max_epochs"] == "1"
    assert run.data.tags["resume.overrides"] == "trainer.max_epochs: 1 -> 2"
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["trainer"]["max_epochs"] == 2


def test_overrides_that_change_what_a_run_measures_are_refused_and_leave_it_untouched(finished):
    cwd, store, run_id = finished
    client = MlflowClient(store)
    before = client.get_run(run_id)
    points = history(client, run_id)

    out = train_exits(
        2,
        f"resume={run_id}",
        "optimizer.lr=0.5",
        "seed=1",
        "batching=online",
        "data.limit_train=200",
        "trainer.max_epochs=3",
        cwd=cwd,
        store=store,
    )
    assert "Traceback" not in out
    for line in (
        "optimizer.lr: recorded 0.001, given 0.5",
        "seed: recorded 0, given 1",
        "batching: recorded mini, given online",
        "data.limit_train: recorded 300, given 200",
    ):
        assert line in out, out[-3000:]
    assert "trainer.max_epochs" not in out.split("differ from its record:")[1].split("A resume may")[0]

    # a FINISHED run resumed without more epochs would only test again: refused, saying what to give
    proc = train(f"resume={run_id}", cwd=cwd, store=store, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "is FINISHED after trainer.max_epochs=" in out and "larger trainer.max_epochs" in out

    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    assert history(client, run_id) == points
    assert after.data.tags == before.data.tags

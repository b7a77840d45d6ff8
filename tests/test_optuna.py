"""hydra/sweeper=optuna end to end: a study nested under one parent run and continued by the same command,
a pruned trial, a study whose trials all fail, bounds checked before launch. Real Hydra, real optuna
storage (sqlite), real MLflow store read with MlflowClient; tiny data (500 examples, 1 epoch)."""

from __future__ import annotations


import optuna
import pytest
from mlflow import MlflowClient

from conftest import train, train_exits

TINY = ("data.limit_train=500", "data.val_size=200", "trainer.max_epochs=1")
STUDY = ("hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optimizer.lr=tag(log,interval(0.0001,0.1))", *TINY)


def record(store: str):
    """(client, parent runs, children by trial number) of the experiment `descent`."""
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("descent")
    found = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in found if r.data.tags.get("descent.sweep") == "true"]
    children = {int(r.data.tags["optuna.trial"]): r for r in found if "optuna.trial" in r.data.tags}
    return client, parents, children


def study_of(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="descent", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_study_nests_under_one_parent_records_its_best_and_goes_on(tmp_path, store, mnist_root):
    train(*STUDY, cwd=tmp_path, store=store, multirun=True)
    client, [parent], children = record(store)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert {
        k: tags[k]
        for k in (
            "optuna.study",
            "optuna.storage",
            "optuna.sampler",
            "optuna.sampler.seed",
            "optuna.direction",
            "optuna.objective",
            "optuna.n_trials",
        )
    } == {
        "optuna.study": "descent",
        "optuna.storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "optuna.sampler": "TPESampler",
        "optuna.sampler.seed": "0",
        "optuna.direction": "minimize",
        "optuna.objective": "val/loss",
        "optuna.n_trials": "2",
    }
    assert sorted(children) == [0, 1]
    study = study_of(tmp_path)
    for number, run in children.items():  # each trial's value is its run's last val/loss: not the test set
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["optuna.study"] == "descent" and run.data.tags["optuna.state"] == "COMPLETE"
        val_loss = client.get_metric_history(run.info.run_id, "val/loss")[-1].value
        assert study.trials[number].value == val_loss
        assert study.trials[number].params["optimizer.lr"] == float(run.data.params["optimizer.lr"])
    best = min(children, key=lambda n: study.trials[n].value)  # minimised
    assert tags["optuna.best_trial"] == str(best) and float(tags["optuna.best_value"]) == study.trials[best].value

    # the same command again (another sweep folder, as a later date-stamped default would be): 2 new trials
    # in the same study, under the same parent
    train(*STUDY, f"hydra.sweep.dir={tmp_path}/outputs/sweep2", cwd=tmp_path, store=store, multirun=True)
    client, [again], children = record(store)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert sorted(children) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    study = study_of(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 4  # no trial proposed again
    assert again.data.tags["optuna.trials"] == "4"
    assert again.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    # the report's search on the parent: every trial in order, its lr and value, the best in bold
    assert {"report/search.png", "report/search.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")
    }
    rows = [line for line in (tmp_path / "outputs/sweep2/search.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| trial | state | optimizer.lr | val/loss |")
    for row, trial in zip(rows[1:], study.trials, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (int(cells[0]), cells[1], float(cells[2])) == (trial.number, "COMPLETE", trial.params["optimizer.lr"])
        assert float(cells[3].strip("*")) == pytest.approx(trial.value, rel=1e-3)
        assert cells[3].startswith("**") == (trial.number == study.best_trial.number)


def test_pruned_trial_ends_killed(tmp_path, store, mnist_root):
    # a grid in a known order (seed 1: lr 0.001, then 1e-7); the second trial's val/loss is worse than the
    # first's at the first validation point (128 examples) and the median pruner stops it there
    train(
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.sampler.seed=1",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "optimizer.lr=choice(0.001,0.0000001)",
        "trainer.val_every_examples=100",
        *TINY,
        cwd=tmp_path,
        store=store,
        multirun=True,
    )
    client, _, children = record(store)
    study = study_of(tmp_path)
    assert [(t.params["optimizer.lr"], t.state.name) for t in study.trials] == [(0.001, "COMPLETE"), (1e-7, "PRUNED")]
    pruned = children[1]
    assert pruned.info.status == "KILLED" and pruned.data.tags["optuna.pruned"] == "true"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val/loss")] == [128]  # stopped at once
    assert "test/acc" not in pruned.data.metrics
    assert children[0].info.status == "FINISHED" and "optuna.pruned" not in children[0].data.tags
    search = (tmp_path / "outputs/sweep/search.md").read_text()  # drawn and listed as pruned, at its stop
    assert "| 1 | PRUNED | 1e-07 |" in search and "| 128 |" in search


def test_study_whose_trials_all_fail_says_so(tmp_path, store, mnist_root):
    out = train_exits(
        1,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=1",
        "optimizer=sgd",
        "optimizer.lr=interval(1e30,1e31)",
        *TINY,
        cwd=tmp_path,
        store=store,
        multirun=True,
    )
    assert out.count("no completed trial") + out.count("no trial completed") == 1  # said once
    assert "the study descent has no completed trial (1 FAIL)" in out
    assert "No trials are completed yet" not in out and "Traceback" not in out
    _, [parent], children = record(store)
    assert parent.info.status == "FAILED" and parent.data.tags["optuna.best_trial"] == "none"
    assert children[0].info.status == "FAILED" and children[0].data.tags["diverged"] == "true"
    assert [t.state.name for t in study_of(tmp_path).trials] == ["FAIL"]


def test_bad_bounds_and_no_validation_data_refused_before_launch(tmp_path, store):
    out = train_exits(
        2,
        "hydra/sweeper=optuna",
        "optimizer.lr=interval(0,3)",
        "data.batch_size=choice(64,100000)",
        "trainer.max_epochs=interval(3,1)",
        cwd=tmp_path,
        store=store,
        multirun=True,
    )
    assert "Traceback" not in out
    for expected in (
        "data.val_size=0: must be > 0 in an Optuna study",
        "optimizer.lr=interval(0,3): value 0.0:\n  optimizer.lr=0.0: must be a finite number > 0",
        "data.batch_size=choice(64,100000): value 100000:\n  data.batch_size=100000: must be",
        "trainer.max_epochs=interval(3,1): not a search space Optuna takes",
    ):
        assert expected in out, out[-3000:]
    assert "value 3:" not in out and "value 64:" not in out  # the valid ends are not named
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "outputs" / "sweep").exists()
    _, parents, children = record(store)
    assert parents == [] and children == {}


def test_a_storage_password_is_not_recorded():
    from descent.sweep.job import shown_storage

    assert (
        shown_storage("postgresql+psycopg2://team:s3cret@db.lab:5432/optuna")
        == "postgresql+psycopg2://team:***@db.lab:5432/optuna"
    )
    socket = "postgresql+psycopg2://mlflow@/optuna?host=/srv/tracking/postgres&port=5432"  # make server's
    assert shown_storage(socket) == socket and shown_storage("sqlite:///optuna.db") == "sqlite:///optuna.db"


def test_failing_grid_cells_do_not_end_the_sweep_and_a_later_grid_keeps_their_job_folders(tmp_path, store, mnist_root):
    # optuna's grid sampler stops its study when its last point is told, which raises outside optimize();
    # upstream's sweeper caught that for a completed trial only: a cell that missed its target ended the sweep
    grid_study = (
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(0.001)",
        "sweep.objective=target/updates",
        "sweep.target_acc=0.99",
        *TINY,
    )
    proc = train(*grid_study, "hydra.sweeper.grid={seed: '0,1'}", cwd=tmp_path, store=store, multirun=True, check=False)
    out = proc.stdout + proc.stderr
    assert "Study.stop" not in out and "Traceback" not in out, out[-3000:]
    assert proc.returncode == 1 and "the study descent has no completed trial (2 FAIL)" in out, out[-3000:]
    for cell in ("descent-0", "descent-1"):  # both cells ran their one trial, which missed 0.99: FAIL
        study = optuna.load_study(study_name=cell, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["FAIL"]
    # another grid under the same sweep folder (and parent run): its job is numbered after the two there
    first = (tmp_path / "outputs/sweep/0/mlflow_run_id").read_text()
    train(*grid_study, "hydra.sweeper.grid={seed: '2'}", cwd=tmp_path, store=store, multirun=True, check=False)
    assert (tmp_path / "outputs/sweep/0/mlflow_run_id").read_text() == first  # job 0's folder is its own still
    assert sorted(p.name for p in (tmp_path / "outputs/sweep").iterdir() if p.name.isdigit()) == ["0", "1", "2"]


def test_the_studys_best_trial_gets_the_alias_best(tmp_path, store, mnist_root):
    import mlflow

    train(*STUDY, "logger.register_model=tiny-study", cwd=tmp_path, store=store, multirun=True)
    client, [parent], children = record(store)
    best = children[int(parent.data.tags["optuna.best_trial"])]  # the study's own choice
    assert client.get_model_version_by_alias("tiny-study", "best").run_id == best.info.run_id
    assert parent.data.tags["descent.sweep.best_run"] == best.info.run_id
    assert "models:/tiny-study@best" in parent.data.tags["mlflow.note.content"]
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model("models:/tiny-study@best")
    assert model.metadata.run_id == best.info.run_id

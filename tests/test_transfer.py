"""`python -m descent.sweep.transfer`: a storage's Optuna studies to a journal file and into another storage,
every trial as it was (parameters, state, value, user attributes); what it cannot use is refused with exit 2
and writes nothing. The end-to-end batch-size study (tests/test_scaling.py) goes on from such a file."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import transfer as run_transfer


def transfer(*args: str):
    return run_transfer(*args, capture_output=True, text=True)


def trials_of(url: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=url)
    return [(t.number, t.state, t.value, t.params, t.user_attrs) for t in study.get_trials()]


def test_studies_go_to_a_file_and_into_another_storage_as_they_were_and_bad_input_is_refused(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = f"sqlite:///{tmp_path / 'optuna.db'}"
    lr = {"optimizer.lr": FloatDistribution(1e-5, 10, log=True)}
    for name, values in (("cell-16", (120.0, None)), ("cell-64", (40.0,))):
        study = optuna.create_study(study_name=name, storage=source)
        study.set_user_attr("descent.cell", {"data.batch_size": name[5:]})
        for i, value in enumerate(values):
            state = TrialState.COMPLETE if value is not None else TrialState.PRUNED
            attrs = {"target/updates/0.95": value} if value is not None else {"descent.role": "search"}
            study.add_trial(
                create_trial(params={"optimizer.lr": 0.01 * 2**i}, distributions=lr, value=value, state=state,
                             user_attrs=attrs)
            )  # fmt: skip
    saved, moved = tmp_path / "study.jsonl", tmp_path / "moved" / "optuna.db"
    done = transfer("export", str(tmp_path / "optuna.db"), str(saved))
    assert done.returncode == 0 and done.stdout.split() == ["cell-16", "cell-64"], done.stderr
    moved.parent.mkdir()
    assert transfer("import", str(saved), str(moved)).returncode == 0
    there = f"sqlite:///{moved}"
    for name in ("cell-16", "cell-64"):
        assert trials_of(there, name) == trials_of(source, name)
    assert optuna.load_study(study_name="cell-16", storage=there).user_attrs == {
        "descent.cell": {"data.batch_size": "16"}
    }

    # refused, exit 2, nothing written: a study the destination has, a study the source lacks, a file that exists,
    # a storage or file that is not there
    clash = transfer("import", str(saved), str(moved))
    assert clash.returncode == 2 and "cell-16, cell-64: already in the destination" in clash.stderr
    assert len(trials_of(there, "cell-16")) == 2
    unknown = transfer("export", str(tmp_path / "optuna.db"), str(tmp_path / "one.jsonl"), "--study", "cell-4")
    assert (
        unknown.returncode == 2 and "--study cell-4: not in" in unknown.stderr and "cell-16, cell-64" in unknown.stderr
    )
    assert not (tmp_path / "one.jsonl").exists()
    again = transfer("export", str(tmp_path / "optuna.db"), str(saved))
    assert again.returncode == 2 and "exists" in again.stderr
    missing = transfer("export", str(tmp_path / "none.db"), str(tmp_path / "two.jsonl"))
    assert missing.returncode == 2 and "none.db: no such file" in missing.stderr
    nofile = transfer("import", str(tmp_path / "none.jsonl"), str(moved))
    assert nofile.returncode == 2 and "none.jsonl: no such file" in nofile.stderr
    # one study only
    one = tmp_path / "one" / "optuna.db"
    one.parent.mkdir()
    assert transfer("import", str(saved), str(one), "--study", "cell-64").returncode == 0
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{one}")] == ["cell-64"]

"""The batch-size study's protocol (descent/sweep/protocol.py) on synthetic cells whose best rate is known: a real
Optuna study driven as the sweeper drives it (ask, the job's target attributes, tell), no training."""

from __future__ import annotations

import math

import optuna
import pytest

from descent.sweep.protocol import Protocol
from descent.tracking.names import target_key

LR = optuna.distributions.FloatDistribution(1e-5, 10.0, log=True)
SEEDS = optuna.distributions.CategoricalDistribution([0, 1, 2])


def run_cell(updates, start=0.01, stops=None, storage=None, cell=None, **kw):
    """Every trial the protocol asks for, in order: (lr, seed, role); updates(lr, seed) -> {target acc: S}. A run
    told where to stop (descent.stop, in `stops` when given) records no target above it, as the job does."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = Protocol(start=start, **kw)
    sampler.space = {"optimizer.lr": LR, "seed": SEEDS}
    study = optuna.create_study(sampler=sampler, storage=storage, study_name=cell and "-".join(map(str, cell.values())))
    if cell:  # a cell of a grid, beside the other cells in one storage (the warm start reads theirs)
        study.set_user_attr("descent.cell", cell)
    asked = []
    while not sampler.finished(study):
        assert len(asked) < 60, asked
        trial = study.ask()
        lr, seed = (
            trial.suggest_float("optimizer.lr", 1e-5, 10.0, log=True),
            trial.suggest_categorical("seed", [0, 1, 2]),
        )
        attrs = study._storage.get_trial(trial._trial_id).user_attrs
        asked.append((lr, seed, attrs["descent.role"]))
        stop = attrs.get("descent.stop", math.inf)
        reached = {acc: s for acc, s in updates(lr, seed).items() if acc <= stop}
        if stops is not None:
            stops.append(stop)
        for acc, s in reached.items():
            trial.set_user_attr(target_key("updates", acc), s)
        study.tell(
            trial,
            max(reached.values()) if reached else None,
            state=optuna.trial.TrialState.COMPLETE if reached else optuna.trial.TrialState.FAIL,
        )
    return asked, sampler.chosen(study)


def bowl(best, depth=100.0, reach=100.0):
    """S(lr) = depth (1 + log(lr/best)²): fewest updates at `best`; rates beyond `reach` x either way miss."""
    return lambda lr, seed: (
        {}
        if abs(math.log(lr / best)) > math.log(reach)
        else {0.97: round(depth * (1 + math.log(lr / best) ** 2) * (1 + 0.01 * seed))}
    )


def test_a_best_at_the_edge_of_what_was_tried_is_extended_until_it_is_not_then_refined_by_sqrt2():
    asked, chosen = run_cell(bowl(0.9), start=0.01)
    search = [lr for lr, _, role in asked if role == "search"]
    # x4 from the start while the best is the largest rate tried: past 0.64 to 2.56, which is worse
    assert search[:5] == pytest.approx([0.01, 0.04, 0.16, 0.64, 2.56])
    # then √2 on both sides of the best until neither neighbour beats it: 0.64√2 = 0.905 is the lattice's best
    assert chosen == {target_key("updates", 0.97): pytest.approx(0.64 * math.sqrt(2))}
    for neighbour in (0.64, 0.64 * 2):
        assert any(math.isclose(lr, neighbour) for lr in search), search
    assert all(seed == 0 for _, seed, role in asked if role == "search")


def test_an_edge_best_below_the_start_is_extended_downwards():
    asked, chosen = run_cell(bowl(2e-4), start=0.01)
    search = [lr for lr, _, role in asked if role == "search"]
    # up once (worse), then down by x4 past the best (0.01/4^3 is the smallest tried when it is best), then √2
    assert search[:6] == pytest.approx([0.01, 0.04, 0.0025, 0.000625, 0.01 / 4**3, 0.01 / 4**4])
    assert chosen[target_key("updates", 0.97)] == pytest.approx(0.01 / 4**3 * math.sqrt(2))  # 2.2e-4
    assert min(search) < chosen[target_key("updates", 0.97)] < max(search)


def test_a_cell_that_misses_at_the_start_looks_both_ways():
    asked, chosen = run_cell(bowl(2e-4, reach=3), start=0.01)
    search = [lr for lr, _, role in asked if role == "search"]
    assert search[:5] == pytest.approx([0.01, 0.04, 0.0025, 0.16, 0.000625])  # missed: up, down, up, down
    assert chosen[target_key("updates", 0.97)] == pytest.approx(0.01 / 4**3 * math.sqrt(2))


def test_the_seed_re_measure_uses_the_chosen_rate_of_each_target():
    # 0.95 is reached fastest at 0.1, 0.98 at 0.4: both rates are chosen, each then run on seeds 1 and 2
    def two(lr, seed):
        return {0.95: round(50 * (1 + math.log(lr / 0.1) ** 2)), 0.98: round(200 * (1 + math.log(lr / 0.4) ** 2))}

    asked, chosen = run_cell(two, start=0.1)
    rates = {0.95: chosen[target_key("updates", 0.95)], 0.98: chosen[target_key("updates", 0.98)]}
    assert rates == {0.95: pytest.approx(0.1), 0.98: pytest.approx(0.4)}
    seeds = [(lr, seed) for lr, seed, role in asked if role == "seed"]
    assert [(round(lr, 9), seed) for lr, seed in seeds] == [(round(r, 9), s) for r in (0.4, 0.1) for s in (1, 2)]
    assert [role for *_, role in asked][-4:] == ["seed"] * 4  # after the search, nothing else
    first = next(i for i, (*_, role) in enumerate(asked) if role == "seed")
    assert all(role == "seed" for *_, role in asked[first:])


def test_a_seed_run_stops_at_the_highest_target_its_rate_was_chosen_for():
    # 0.95 and 0.96 are fastest at 0.1, 0.98 at 0.4: the seed runs at 0.1 need not go on to 0.98
    def three(lr, seed):
        return {
            0.95: round(50 * (1 + math.log(lr / 0.1) ** 2)),
            0.96: round(80 * (1 + math.log(lr / 0.1) ** 2)),
            0.98: round(200 * (1 + math.log(lr / 0.4) ** 2)),
        }

    stops = []
    asked, chosen = run_cell(three, start=0.1, stops=stops)
    roles = [(round(lr, 9), role, stop) for (lr, _, role), stop in zip(asked, stops)]
    assert {stop for _, role, stop in roles if role == "search"} == {math.inf}  # on to the highest target
    assert [(lr, stop) for lr, role, stop in roles if role == "seed"] == [(0.4, 0.98)] * 2 + [(0.1, 0.96)] * 2
    assert chosen[target_key("updates", 0.96)] == pytest.approx(0.1)


def test_a_cell_where_no_rate_reaches_a_target_gives_up_within_its_cap():
    asked, chosen = run_cell(lambda lr, seed: {}, start=0.01, max_search=6)
    assert len(asked) == 6 and chosen == {}
    assert all(role == "search" for *_, role in asked)


def test_the_reference_cell_runs_its_chosen_rate_once_more_with_the_noise_scale_measured():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = Protocol(start=0.64, reference={"data.batch_size": 128})
    flag = optuna.distributions.CategoricalDistribution([False, True])
    sampler.space = {"optimizer.lr": LR, "seed": SEEDS, "trainer.noise_at_targets": flag}
    study = optuna.create_study(sampler=sampler)
    study.set_user_attr("descent.cell", {"optimizer": "sgd", "data.batch_size": "128"})
    asked, f = [], bowl(0.9)
    while not sampler.finished(study):
        trial = study.ask()
        lr, seed = (
            trial.suggest_float("optimizer.lr", 1e-5, 10.0, log=True),
            trial.suggest_categorical("seed", [0, 1, 2]),
        )
        asked.append((lr, seed, trial.suggest_categorical("trainer.noise_at_targets", [False, True])))
        trial.set_user_attr(target_key("updates", 0.97), f(lr, seed)[0.97])
        study.tell(trial, f(lr, seed)[0.97])
    assert [a[2] for a in asked].count(True) == 1 and asked[-1] == (pytest.approx(0.64 * math.sqrt(2)), 0, True)


def test_a_trial_interrupted_with_its_command_is_proposed_again():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = Protocol(start=0.1)
    sampler.space = {"optimizer.lr": LR, "seed": SEEDS}
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    first = trial.suggest_float("optimizer.lr", 1e-5, 10.0, log=True)
    assert sampler.finished(study)  # it waits on the running trial
    # what the sweeper does to a trial an earlier command left running
    study._storage.set_trial_user_attr(trial._trial_id, "descent.interrupted", True)
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    again = study.ask()
    assert again.suggest_float("optimizer.lr", 1e-5, 10.0, log=True) == first


def test_a_warm_started_cell_whose_first_rate_misses_looks_down_first():
    # B = 64 chooses 0.1; B = 256 starts from 0.1 x √4 = 0.2, where (as for SGD past its critical batch size) it
    # diverges: a rate scaled up from a neighbour that misses is too high, so the next step is down
    storage = optuna.storages.InMemoryStorage()
    run_cell(
        bowl(0.1),
        start=0.1,
        storage=storage,
        cell={"optimizer": "sgd", "data.batch_size": "64"},
        warm="data.batch_size",
    )
    asked, chosen = run_cell(
        bowl(0.05, reach=3),
        start=0.1,
        storage=storage,
        cell={"optimizer": "sgd", "data.batch_size": "256"},
        warm="data.batch_size",
    )
    search = [lr for lr, _, role in asked if role == "search"]
    assert search[:2] == pytest.approx([0.2, 0.05])  # the warm start, then down by 4 (not up to 0.8)
    assert chosen[target_key("updates", 0.97)] == pytest.approx(0.05)
    cold, _ = run_cell(bowl(2e-4, reach=3), start=0.01)
    assert [lr for lr, _, role in cold if role == "search"][:2] == pytest.approx([0.01, 0.04])  # a cold start: up


def test_a_search_trial_gets_a_deadline_at_the_lowest_target_from_the_next_smaller_batch_size():
    # B = 64 reaches 0.95 in 50 updates at best (half its bowl's 0.97 count); B = 256's search trials get 4 x 50
    # at 0.95 and nothing at 0.97 (to the highest target a larger batch may need more updates), its seed runs
    # none; B = 16, with no smaller cell, gets none, nor does a cell of another optimizer
    storage = optuna.storages.InMemoryStorage()
    grid = lambda opt, b: {"optimizer": opt, "data.batch_size": b}
    kw = dict(start=0.1, storage=storage, warm="data.batch_size", neighbour_bound=4.0)

    def two(best):
        one = bowl(best)
        return lambda lr, seed: {acc: s / f for acc, f in ((0.95, 2), (0.97, 1)) for s in one(lr, seed).values()}

    run_cell(two(0.1), cell=grid("sgd", "64"), **kw)
    for b in ("256", "16"):
        run_cell(two(0.05), cell=grid("sgd", b), **kw)
    run_cell(two(0.05), cell=grid("adam", "256"), **kw)
    bounds = {
        name: [(t.user_attrs["descent.role"], t.user_attrs.get("descent.bound")) for t in study_trials(storage, name)]
        for name in ("sgd-256", "sgd-16", "adam-256")
    }
    assert all(b == {"0.95": 200.0} for role, b in bounds["sgd-256"] if role == "search"), bounds["sgd-256"]
    assert all(b is None for role, b in bounds["sgd-256"] if role != "search")
    assert all(b is None for _, b in bounds["sgd-16"] + bounds["adam-256"])


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)

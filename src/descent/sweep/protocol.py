"""The batch-size study's protocol for one cell (optimizer, batch size): an Optuna sampler
(hydra/sweeper/sampler=protocol, conf/hydra/sweeper/sampler/protocol.yaml).

1. The rate, on the first seed: a local search on a log lattice. From a start it steps by `coarse` (x4) while
   the best rate is the largest (smallest) tried (a best at the edge of what was tried is extended until it is
   not), then by `fine` (√2) on both sides of the best until both neighbours are tried and neither beats it.
   It does so for every target the runs record (target/updates/<acc>, descent/sweep/job.py's Target): the
   best rate may differ by target. "Best" is the fewest updates to the target; a tie goes to the smaller rate.
2. The measurement: each chosen rate again on the other seeds (the run of the first seed at that rate is
   its first measurement: the same run), never pruned. A cell's point for a target is the median over the
   seeds at that target's rate (descent/reports/scaling.py): the trials that chose the rate are not the only
   ones that measure it, so the winner's curse of "min over noisy trials" is left to one seed in three.

The seeds are the choices of the seed parameter (hydra.sweeper.params.seed: choice(0,1,2)), the rates' bounds
the interval of the rate parameter (tag(log, interval(1e-5, 10))). The sampler decides from the study's trials
alone (their rates, seeds, states and target user attributes), so a stopped study goes on where it stopped:
the same command proposes the next rate, or nothing once the cell is done (the sweeper then moves on).

3. The reference (cells matching `reference`, e.g. data.batch_size 128): the first seed at the rate chosen for
   the highest target once more, with `reference_param` (trainer.noise_at_targets) true: B_simple measured
   at each target crossing along that trajectory, to set beside B_crit.

Where the runs stop: a search trial and the reference go on to the highest target (sweep.target_acc); a seed run
stops at the highest target its rate was chosen for (user attribute descent.stop, which the job makes its
sweep.target_acc: a rate chosen for 0.95 alone is not run on to 0.98, which at that rate may take the budget).

4. A deadline from the smaller neighbour (`neighbour_bound`, e.g. 4): a search trial that has not reached the
   lowest target after that many times the fewest updates any run of the nearest smaller cell along `warm` took
   to it is pruned (user attribute descent.bound, {target: updates}, read by the job's Target). To a low target
   a larger batch needs about as many updates as a smaller one or fewer (S(B) = S_min + E_min/B); a rate that is
   4x slower there diverged or stalls, as a warm start's rate does past the critical batch size, and would
   otherwise run the whole budget. Only the lowest target: to the highest (val/acc 0.98) plain SGD took 2.9x
   the updates at B = 4096 that it took at 1024 (3264 against 1142), so a deadline there would prune the
   cell's best.

Any optimizer, any cell: nothing here knows what is trained. `start` gives the first rate per value of the
cell (e.g. per optimizer); `warm` starts a cell from the rate its neighbour along that key chose (the last
batch size done), scaled by (B/B')^warm_power.
"""

from __future__ import annotations

import math

from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler

from descent.tracking.names import BOUND, CELL, INTERRUPTED, PRUNE, ROLE, STOP, TARGET_UPDATES

UPDATES = TARGET_UPDATES + "/"  # + the target: descent.tracking.names.target_key("updates", acc)


def targets_of(trials) -> list[str]:
    """The target keys any trial recorded (target/updates/0.95, ...), highest target first."""
    keys = {k for t in trials for k in t.user_attrs if k.startswith(UPDATES)}
    return sorted(keys, key=lambda k: -float(k[len(UPDATES) :]))


def same(a: float, b: float) -> bool:
    return abs(math.log(a) - math.log(b)) < 1e-6


def best_rate(trials, key: str, lr_param: str) -> float | None:
    """The rate of the finished trial that reached `key` in the fewest updates (a tie: the smaller rate)."""
    reached = [(t.user_attrs[key], t.params[lr_param]) for t in trials if key in t.user_attrs and lr_param in t.params]
    return min(reached)[1] if reached else None


class Protocol(BaseSampler):
    def __init__(
        self,
        lr_param: str = "optimizer.lr",
        seed_param: str = "seed",
        start: dict | float | None = None,
        coarse: float = 4.0,
        fine: float = math.sqrt(2),
        max_search: int = 16,
        warm: str | None = None,
        warm_power: float = 0.5,
        neighbour_bound: float | None = None,
        reference: dict | None = None,
        reference_param: str = "trainer.noise_at_targets",
        seed: int | None = None,
    ):
        self.lr_param, self.seed_param = lr_param, seed_param
        self.start = dict(start) if hasattr(start, "items") else start  # a DictConfig from hydra's instantiate
        self.coarse, self.fine, self.max_search = coarse, fine, max_search
        self.warm, self.warm_power, self.neighbour_bound = warm, warm_power, neighbour_bound
        self.reference, self.reference_param = dict(reference or {}), reference_param
        self._planned: dict[int, dict] = {}  # trial id -> its params (each param is asked for separately)
        self.space: dict = {}  # the search space's distributions: the sweeper hands them over before asking

    # -- optuna's interface: every parameter independently, from the plan made for the trial -------------------

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, distribution):
        if trial._trial_id not in self._planned:
            plan = self.plan(study, self._space(study, param_name, distribution), exclude=trial.number)
            if plan is None:  # the sweeper asks only while finished() is False; another process got there first
                raise RuntimeError(f"study {study.study_name}: the protocol has nothing left to run")
            self._planned[trial._trial_id] = plan
            study._storage.set_trial_user_attr(trial._trial_id, ROLE, plan["role"])
            study._storage.set_trial_user_attr(trial._trial_id, PRUNE, plan["role"] == "search")
            if "stop" in plan:
                study._storage.set_trial_user_attr(trial._trial_id, STOP, plan["stop"])
            if plan["role"] == "search" and (bound := self.bound(study)):
                study._storage.set_trial_user_attr(trial._trial_id, BOUND, bound)
        plan = self._planned[trial._trial_id]
        if param_name == self.lr_param:
            return plan["lr"]
        if param_name == self.seed_param:
            return plan["seed"]
        if param_name == self.reference_param:
            return plan["role"] == "reference"
        raise ValueError(
            f"the protocol sampler sets {self.lr_param}, {self.seed_param} and {self.reference_param} "
            f"only; {param_name} "
            f"belongs in hydra.sweeper.grid or on the command line"
        )

    # -- the protocol -----------------------------------------------------------------------------------------

    def _space(self, study, name=None, distribution=None) -> dict:
        """The distributions of the rate and the seed: from the trials, or the one being asked for."""
        space = dict(self.space)
        if name is not None:
            space.setdefault(name, distribution)
        for t in study.get_trials(deepcopy=False):
            for k, d in t.distributions.items():
                space.setdefault(k, d)
        self.space = space
        return space

    def seeds(self, space) -> list:
        d = space.get(self.seed_param)
        return list(d.choices) if isinstance(d, CategoricalDistribution) else [0]

    def bounds(self, space) -> tuple[float, float]:
        d = space.get(self.lr_param)
        return (d.low, d.high) if isinstance(d, FloatDistribution) else (1e-12, 1e12)

    def first_rate(self, study, low: float, high: float) -> float:
        if self.warm and (warm := self._warm_start(study)) is not None:
            return min(max(warm, low), high)
        start = self.start
        if isinstance(start, dict):  # a value of the cell (an optimizer's name) -> its first rate
            cell = study.user_attrs.get(CELL, {})
            start = next((start[v] for v in map(str, cell.values()) if v in start), start.get("default"))
        return float(start) if start is not None else math.sqrt(low * high)

    def _neighbours(self, study):
        """(my value along `warm`, theirs, their finished trials) for every other cell that differs only there."""
        cell = study.user_attrs.get(CELL)
        if not cell or self.warm not in cell:
            return
        for other in study._storage.get_all_studies():
            theirs = other.user_attrs.get(CELL, {})
            if (
                other.study_name == study.study_name
                or set(theirs) != set(cell)
                or any(str(theirs[k]) != str(cell[k]) for k in cell if k != self.warm)
            ):
                continue
            trials = [
                t for t in study._storage.get_all_trials(other._study_id, deepcopy=False) if t.state.is_finished()
            ]
            yield float(cell[self.warm]), float(theirs[self.warm]), trials

    def _warm_start(self, study) -> float | None:
        """The rate the nearest finished neighbour along `warm` chose for its highest target, scaled."""
        best = None
        for mine, theirs, trials in self._neighbours(study):
            trials = [t for t in trials if t.user_attrs.get(ROLE, "search") == "search"]
            keys = targets_of(trials)
            rate = best_rate(trials, keys[0], self.lr_param) if keys else None
            distance = abs(math.log(theirs / mine))
            if rate is not None and (best is None or distance < best[0]):
                best = (distance, rate * (mine / theirs) ** self.warm_power)
        return best[1] if best else None

    def bound(self, study) -> dict[str, float]:
        """{the lowest target: neighbour_bound x the fewest updates any run of the nearest smaller cell took to it}."""
        if not self.neighbour_bound:
            return {}
        smaller = [(theirs, trials) for mine, theirs, trials in self._neighbours(study) if theirs < mine]
        for _, trials in sorted(smaller, key=lambda c: -c[0]):  # the nearest that reached a target
            if keys := targets_of(trials):
                k = keys[-1]  # targets_of: highest first
                return {
                    k[len(UPDATES) :]: self.neighbour_bound * min(t.user_attrs[k] for t in trials if k in t.user_attrs)
                }
        return {}

    def plan(self, study, space=None, exclude: int | None = None) -> dict | None:
        """The next trial's {lr, seed, role}, or None when the cell is done (or waits on running trials)."""
        space = space if space is not None else self._space(study)
        trials = [
            t for t in study.get_trials(deepcopy=False) if t.number != exclude and not t.user_attrs.get(INTERRUPTED)
        ]
        seeds = self.seeds(space)
        low, high = self.bounds(space)
        search = [t for t in trials if t.user_attrs.get(ROLE, "search") == "search" and self.lr_param in t.params]
        tried = [t.params[self.lr_param] for t in search]
        done = [t for t in search if t.state.is_finished()]
        untried = lambda lr: low * (1 - 1e-9) <= lr <= high * (1 + 1e-9) and not any(same(lr, x) for x in tried)
        search_plan = lambda lr: {"lr": lr, "seed": seeds[0], "role": "search"}
        if not search:
            return search_plan(self.first_rate(study, low, high))
        keys = targets_of(done)
        if not keys:  # no rate reached any target yet: outward from what was tried, alternating; up first from
            # a cold start, down first from a warm one (a neighbour's rate scaled up by (B/B')^warm_power that
            # misses is too high: past the critical batch size the best rate stops growing with B)
            if len(search) >= self.max_search or len(done) < len(search):
                return None
            up, down = max(tried) * self.coarse, min(tried) / self.coarse
            above = sum(x > tried[0] * (1 + 1e-9) for x in tried)  # steps taken each way from the start
            below = sum(x < tried[0] * (1 - 1e-9) for x in tried)
            up_first = above <= below if not (self.warm and self._warm_start(study) is not None) else above < below
            for lr in (up, down) if up_first else (down, up):
                if untried(lr):
                    return search_plan(lr)
            return None
        chosen = []
        for key in keys:
            b = best_rate(done, key, self.lr_param)
            chosen.append(b)
            if len(search) >= self.max_search:
                continue
            if same(b, max(tried)):  # the edge of what was tried: extend
                candidates = [b * self.coarse, b * self.fine]
            elif same(b, min(tried)):
                candidates = [b / self.coarse, b / self.fine]
            else:
                candidates = [b * self.fine, b / self.fine]
            for lr in candidates:
                if untried(lr):
                    return search_plan(lr)
        if len(done) < len(search):
            return None  # a running trial may still move a best
        measured = {
            (t.params[self.lr_param], t.params.get(self.seed_param, seeds[0]))
            for t in trials
            if t.user_attrs.get(ROLE) == "seed" and self.lr_param in t.params
        }
        for lr in sorted(set(chosen), key=chosen.index):
            for s in seeds[1:]:
                if not any(same(lr, x) and s == y for x, y in measured):
                    stop = max(float(k[len(UPDATES) :]) for k, b in zip(keys, chosen) if same(b, lr))
                    return {"lr": lr, "seed": s, "role": "seed", "stop": stop}
        cell = {k: str(v) for k, v in study.user_attrs.get(CELL, {}).items()}
        if (
            self.reference
            and all(cell.get(k) == str(v) for k, v in self.reference.items())
            and not any(t.user_attrs.get(ROLE) == "reference" for t in trials)
        ):
            # the reference trajectory: the first seed at the rate chosen for the highest target, run again with
            # the noise scale measured at each target (it trains exactly as the search's run did)
            return {"lr": chosen[0], "seed": seeds[0], "role": "reference"}
        return None

    def finished(self, study) -> bool:
        """Nothing left to propose now (the sweeper's cue to move to the next cell)."""
        return self.plan(study) is None

    def chosen(self, study) -> dict[str, float]:
        """target key -> the rate chosen for it (on the first seed)."""
        done = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state.is_finished()
            and t.user_attrs.get(ROLE, "search") == "search"
            and not t.user_attrs.get(INTERRUPTED)
        ]
        return {key: best_rate(done, key, self.lr_param) for key in targets_of(done)}

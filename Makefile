# `make train` and `make test` set up .venv on first use (and again when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test bench clean ui server server-stop ray ray-stop slurm slurm-stop

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,server,ray,slurm,optuna]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python src/train.py $(ARGS)

# two pytest workers (pytest-xdist), each test file whole on one worker (its session fixtures shared): most tests
# wait on a subprocess's start-up or a service, so two at a time fill the 2 cores; TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the MLflow UI on 127.0.0.1:$(UI_PORT) over the project's store (or $$MLFLOW_TRACKING_URI), one worker and no
# job-execution workers (descent/ui.py; the browser test starts it the same way)
UI_PORT ?= 5000
ui: $(STAMP)
	$(BIN)/python -m descent.ui --port $(UI_PORT)

# the team tracking server: PostgreSQL + MLflow on 127.0.0.1:5000, state in outputs/tracking/ (see README)
server: $(STAMP)
	$(BIN)/python -m descent.server start $(ARGS)

server-stop: $(STAMP)
	$(BIN)/python -m descent.server stop $(ARGS)

# single-node clusters for hydra/launcher=ray|slurm (see README, "Sweeps on a cluster"): a Ray head and one
# worker node (state in outputs/ray/), SLURM's munged + slurmctld + slurmd as root (outputs/slurm/)
ray: $(STAMP)
	$(BIN)/python -m descent.cluster ray start $(ARGS)

ray-stop: $(STAMP)
	$(BIN)/python -m descent.cluster ray stop $(ARGS)

slurm: $(STAMP)
	$(BIN)/python -m descent.cluster slurm start $(ARGS)

slurm-stop: $(STAMP)
	$(BIN)/python -m descent.cluster slurm stop $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) outputs/multiruns outputs/runs

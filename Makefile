# Each target sets up .venv on first use (and again when pyproject.toml changes) with only what it needs:
# `make train` the base package (torch, Lightning, Hydra, MLflow), `make test` every extra the tests use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
FULL := $(VENV)/.installed-full
DOCS := $(VENV)/.installed-docs

.PHONY: train test docs bench clean ui server server-stop ray ray-stop slurm slurm-stop

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $(BASE)

$(DOCS): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[docs]'
	touch $(DOCS)

$(FULL): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,server,ray,slurm,optuna,docs]'
	touch $(FULL) $(BASE) $(DOCS)

train: $(BASE)
	$(BIN)/python src/train.py $(ARGS)

# the docs site (mkdocs-material) on http://127.0.0.1:$(DOCS_PORT), rebuilt on every change; offline
DOCS_PORT ?= 8000
docs: $(DOCS)
	$(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:$(DOCS_PORT) --watch conf --watch notebooks --watch src

# two pytest workers (pytest-xdist), each test file whole on one worker (its session fixtures shared): most tests
# wait on a subprocess's start-up or a service, so two at a time fill the 2 cores; TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
test: $(FULL)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the MLflow UI on 127.0.0.1:$(UI_PORT) over the project's store (or $$MLFLOW_TRACKING_URI), one worker and no
# job-execution workers (descent/services/ui.py; the browser test starts it the same way)
UI_PORT ?= 5000
ui: $(BASE)
	$(BIN)/python -m descent.services.ui --port $(UI_PORT)

# the team tracking server: PostgreSQL + MLflow on 127.0.0.1:5000, state in outputs/tracking/ (docs/how-to/team-server.md)
server: $(BASE)
	$(BIN)/python -m descent.services.server start $(ARGS)

server-stop: $(BASE)
	$(BIN)/python -m descent.services.server stop $(ARGS)

# single-node clusters for hydra/launcher=ray|slurm (docs/how-to/cluster.md): a Ray head and one
# worker node (state in outputs/ray/), SLURM's munged + slurmctld + slurmd as root (outputs/slurm/)
ray: $(BASE)
	$(BIN)/python -m descent.services.cluster ray start $(ARGS)

ray-stop: $(BASE)
	$(BIN)/python -m descent.services.cluster ray stop $(ARGS)

slurm: $(BASE)
	$(BIN)/python -m descent.services.cluster slurm start $(ARGS)

slurm-stop: $(BASE)
	$(BIN)/python -m descent.services.cluster slurm stop $(ARGS)

bench: $(BASE)
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) outputs/multiruns outputs/runs

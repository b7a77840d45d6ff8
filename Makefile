# `make train` and `make test` set up .venv on first use (and again when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test bench clean server server-stop

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,server]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python src/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the team tracking server: PostgreSQL + MLflow on 127.0.0.1:5000, state in outputs/tracking/ (see README)
server: $(STAMP)
	$(BIN)/python -m descent.server start $(ARGS)

server-stop: $(STAMP)
	$(BIN)/python -m descent.server stop $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) outputs/multiruns outputs/runs

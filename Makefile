# Two entry points: `make run` (default suite) and `make test`. Both depend on `make setup`, which is idempotent:
# it rebuilds .venv only when pyproject.toml or constraints.txt changed since the last successful install.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
EXTRAS ?= dev,nudenet,fid,slurm

.PHONY: setup run test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first, from its pinned CPU build; then the project with every other version constrained.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: setup
	$(BIN)/bench run

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-enable -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Two entry points: `make run` (default suite) and `make test`. Both depend on `make setup`, which is idempotent:
# it rebuilds .venv only when pyproject.toml or constraints.txt changed since the last successful install.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
EXTRAS ?= dev,nudenet,fid,slurm

.PHONY: setup run test test-slow lint bench check-toy baseline-toy clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first, from its pinned CPU build; then the project with every other version constrained.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# The default suite on WORKERS processes (CPU threads are split between them: the thread count is part of every
# stage key, so this cache is shared with other runs at the same per-process thread count).
WORKERS ?= 2
run: setup
	$(BIN)/bench run --workers $(WORKERS)

test: setup
	$(BIN)/python -m pytest -q

# The CI regression gate: one seed of the toy suite's core cells against the committed baseline. Every stage runs
# single-threaded, as the baseline was made, so the numbers do not depend on the core count; two single-threaded
# workers take independent stages side by side (the thread count, not the worker count, is in the stage keys).
# The store is kept between runs.
CHECK_OUT ?= results/ci-run
CHECK_WORKERS ?= 2
check-toy: setup
	OMP_NUM_THREADS=1 $(BIN)/bench run --suite toy-ci --out $(CHECK_OUT) -q --workers $(CHECK_WORKERS) --threads 1
	$(BIN)/bench check $(CHECK_OUT) --baseline results/baselines/toy-ci.csv --tolerance 2se --tolerance 0.05

# Re-make the baseline after an intended change of the numbers (commit results/baselines/toy-ci.csv with the change).
baseline-toy: setup
	OMP_NUM_THREADS=1 $(BIN)/bench run --suite toy-ci --out results/toy-ci -q --workers $(CHECK_WORKERS) --threads 1
	$(BIN)/bench check results/toy-ci --baseline results/baselines/toy-ci.csv --update

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-enable -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

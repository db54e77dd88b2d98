# Every target does its set-up from nothing. Two test lanes: `make check` (lint + unit tests, the edit loop)
# and `make test` (everything, what CI runs); the lanes are chosen by pytest markers (pyproject.toml). Both spread
# the tests over one pytest-xdist worker per core, a test file per worker (module-scoped workspaces built once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PARALLEL := -n auto --dist loadfile

.PHONY: demo check test lint bench faults fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/run_demo.py

check: $(STAMP)
	$(BIN)/ruff check wsi_pipeline tests benchmarks examples
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not (e2e or browser or demo or memory or slow or faults)"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL)

lint: $(STAMP)
	$(BIN)/ruff check wsi_pipeline tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

faults: $(STAMP)
	$(BIN)/python -m pytest -q -s -m faults tests/test_faults.py

# 4 generators x 1250 examples: labels CSVs, YAML configs, slide file names, patch numbers (docs/reliability.md)
fuzz: $(STAMP)
	WSIP_FUZZ_EXAMPLES=1250 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

clean:
	rm -rf $(VENV) wsip_out demo_out .pytest_cache

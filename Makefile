# Every target does its set-up from nothing. Two test lanes: `make check` (lint + unit tests, the edit loop)
# and `make test` (everything, what CI runs); the lanes are chosen by pytest markers (pyproject.toml). Both spread
# the tests over one pytest-xdist worker per core, a test file per worker (module-scoped workspaces built once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PARALLEL := -n auto --dist loadfile

.PHONY: demo check test lint bench faults fuzz clean

# pip byte-compiles what it installs on one core (about 60 s of torch here); compileall does it on every core.
# As under pip, a file written for a newer Python (torch ships a few) is skipped, not an error.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	touch $(STAMP)

# The package's byte code, so that the many `wsip` processes the tests start do not each recompile it where
# PYTHONDONTWRITEBYTECODE is set (about 0.7 s each); stale files are ignored by Python, never used.
COMPILE := $(BIN)/python -m compileall -q wsi_pipeline >/dev/null

demo: $(STAMP)
	$(BIN)/python examples/run_demo.py

check: $(STAMP)
	$(BIN)/ruff check wsi_pipeline tests benchmarks examples
	$(COMPILE)
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not (e2e or browser or demo or memory or slow or faults)"

test: $(STAMP)
	$(COMPILE)
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

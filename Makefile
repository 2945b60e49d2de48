# `make test` and `make demo` each build or refresh .venv from scratch, then run.
# The first interpreter in the range TensorFlow 2.21 and Ray 2.60 publish wheels
# for (3.11-3.13); `make PYTHON=python3.12 test` picks one yourself.
SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
ifeq ($(origin PYTHON), undefined)
PYTHON := $(shell for p in python3.11 python3.12 python3.13 python3 python; do \
	$$p -c '$(SUPPORTED)' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: venv test test-fast fuzz demo bench gpu-check clean

venv: $(STAMP)

# Re-installs whenever pyproject.toml changes; a broken or half-built .venv is rebuilt.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python 3.11-3.13 found: install one and run e.g. make PYTHON=python3.12 $(MAKECMDGOALS)" >&2; exit 2; }
	@$(PYTHON) -c '$(SUPPORTED)' || { echo "$(PYTHON) is not Python 3.11-3.13: run e.g. make PYTHON=python3.12 $(MAKECMDGOALS)" >&2; exit 2; }
	@test -x $(PY) && $(PY) -c "import sys" 2>/dev/null || (rm -rf $(VENV) && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install --quiet --upgrade pip
	# Bytecode is compiled afterwards on every core (pip compiles one file at a
	# time); like pip, a file that does not compile is left to Python at import.
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	@touch $(STAMP)

# Hypothesis tests run a fixed set of examples (the "ci" profile, tests/conftest.py).
# TEST_WORKERS pytest processes (pytest-xdist), each test file in one of them, so
# that a file's shared fixtures (trained models, a Ray cluster) are built once;
# the longest files go first (tests/conftest.py), in that order.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# Skips the end-to-end runs marked slow (CI runs everything through `make test`).
test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# The hypothesis tests with new random examples, FUZZ_EXAMPLES of them per test
# (default 5000); a failure is saved in .hypothesis/ and replayed first next time.
FUZZ_EXAMPLES ?= 5000
fuzz: venv
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m hypothesis --hypothesis-profile=fuzz \
		--hypothesis-show-statistics

demo: venv
	$(PY) -m jobs.demo --workdir $(DEMO_DIR)

bench: venv
	$(PY) -m tests.benchmarks.run

# The GPU training path (MultiWorkerMirroredStrategy, mixed precision, XLA,
# checkpoint + restore) on this machine's GPUs, with images/s and GPU
# utilisation; exits 0 with a line saying it skipped where no GPU is visible.
gpu-check: venv
	$(PY) -m tests.gpu_check

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

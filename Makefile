# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the project with what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch that lies on this project's machines' disk; any other spec
# downloads a multi-GB CUDA build. torch is only used by tests and import/export.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast docs bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,test,web]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ovseg_jax.demo --out outputs/demo

# Test files are spread over TEST_WORKERS processes (a file's tests stay in one, so its
# module-scoped fixtures are built once), in the order tests/conftest.py gives them (the longest
# files first; --no-loadscope-reorder keeps xdist from sorting them by test count);
# `make test TEST_WORKERS=0` runs them in this process. The 20 slowest tests are listed at the end.
TEST_WORKERS ?= 2
TEST_SPREAD := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PY) -m pytest -q $(TEST_SPREAD) --durations=20 tests

# The edit loop (under 2 minutes): everything but the tests marked slow (2 s or more each: training
# runs, the demo and its users, the served web app, subprocesses; docs/contributing.md).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(TEST_SPREAD) -m "not slow" tests

# The documentation site into build/site; --strict fails on a broken link or a missing API object.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# Short versions of every ovseg_jax-vs-torch bench (<= 10 min on 2 quiet cores), then one Markdown
# table (command, commit, machine and load, torch threads) for docs/performance.md's make-bench section.
bench: $(STAMP)
	$(PY) bench/make_bench.py

clean:
	rm -rf outputs .pytest_cache

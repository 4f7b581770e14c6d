# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck unit compile demo bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CANARY_PROXY_COMPILE=0 $(BIN)/pip install --quiet --only-binary=aiohttp -e '.[test]'
	touch $(STAMP)

# The data plane's hot modules compiled in place with mypyc (the list is in setup.py); tests
# and benchmarks run what a wheel ships. Needs a C compiler (.ci/run installs gcc).
COMPILED := $(VENV)/.compiled
# flock: two builds at once in one checkout would write the same files under build/.
$(COMPILED): $(STAMP) setup.py $(wildcard proxy/*.py proxy/*/*.py)
	flock build.lock $(BIN)/python setup.py --quiet build_ext --inplace
	@# mypyc regenerates the C from the sources; an extension it did not rebuild is current.
	find proxy -name '*.so' -exec touch {} +
	touch $(COMPILED)

compile: $(COMPILED)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The pure core (proxy/core/: every decision) keeps 100 % branch coverage.
PURE_CORE := proxy/core/*,proxy/core/*/*

unit: $(COMPILED)
	$(BIN)/pytest -q --cov=proxy --cov-branch --cov-report=
	@# Quiet when it holds, so pytest's summary stays the last line of the run.
	@$(BIN)/coverage report --fail-under=100 --include='$(PURE_CORE)' >/dev/null || \
		{ $(BIN)/coverage report --show-missing --include='$(PURE_CORE)'; exit 1; }

test: lint typecheck unit

# `make demo SCENARIO=fleet` (or healthy): the demo's other stories.
SCENARIO ?= failing

demo: $(STAMP)
	$(BIN)/canary-proxy demo --scenario $(SCENARIO)

# The benchmark's extra (matplotlib, for its chart) on top of the test set-up; see benchmarks/.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	CANARY_PROXY_COMPILE=0 $(BIN)/pip install --quiet --only-binary=aiohttp -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(COMPILED)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build
	find proxy -name '*.so' -delete

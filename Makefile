# The two entry points of the README: `make demo` and `make test`.
# Both set up everything they need from nothing but python3 (3.11+) and make.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint unit setup system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.test-installed

# the end-to-end tests drive real curl and openssl clients
system-deps:
	@if ! command -v curl >/dev/null || ! command -v openssl >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq curl openssl; \
	fi

demo: $(VENV)/.demo-installed
	$(BIN)/burrow demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: system-deps lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

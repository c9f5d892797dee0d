# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo test test-fast bench schemas lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.writing

# The whole suite on the embedded broker, then the integration and fault tests again on
# a three-node Apache Kafka cluster (tests/README.md says which tests run where and why).
# MESH_TEST_KAFKA (or MESH_KAFKA__BOOTSTRAP_SERVERS) set: the whole suite once, there.
# pytest's exit code 5 (no tests collected) fails the target like any other failure.
# Each session runs on WORKERS pytest-xdist workers: the tests mostly wait (on the broker,
# on group rebalances, on processes they killed), so three share two cores; a test file
# stays on one worker (its module fixtures, e.g. a cluster of its own, start once).
# Apache session: the integration and fault tests that use the session's broker (or are
# marked apache), minus test_apache_broker.py (its own JVMs: it ran in the first session)
# and minus the tests marked broker_agnostic (a layer above the transport: CI time).
# APACHE_WORKERS: the Apache session's workers. 2 workers with a C1-only JIT took 51 min
# there (fresh-clone CI, 2026-12-02) against 22 min with 3 and the default JIT.
WORKERS ?= 3
APACHE_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest --dist loadfile --durations=15
APACHE_TESTS := --broker-tests-only -m "not broker_agnostic" tests/integration tests/faults \
	--ignore=tests/integration/test_apache_broker.py

test: $(STAMP)
	$(BIN)/mesh schemas check
ifneq ($(MESH_TEST_KAFKA)$(MESH_KAFKA__BOOTSTRAP_SERVERS),)
	$(PYTEST) -n $(WORKERS)
else
	$(PYTEST) -n $(WORKERS)
	MESH_TEST_KAFKA=apache $(PYTEST) -n $(APACHE_WORKERS) $(APACHE_TESTS)
endif

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP)
	$(BIN)/python bench/chain.py

schemas: $(STAMP)
	$(BIN)/mesh schemas export

# ruff and mypy (strict, see pyproject.toml) on mesh/; the `lint` extra on top of the test one
$(LINT_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check mesh; ruff=$$?; $(BIN)/mypy && exit $$ruff

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache

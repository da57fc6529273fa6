# teia — every target bootstraps what it needs (virtualenv, Python and Rust dependencies,
# the extension build) on a fresh machine.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export PYO3_PYTHON := $(abspath $(PY))
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)
PYTEST_ARGS ?=
PY_DIRS := $(wildcard python tests benchmarks examples)

RUST_SOURCES := $(shell find rust/src -name '*.rs' 2>/dev/null) Cargo.toml rust/Cargo.toml
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILT := $(VENV)/.extension-built
# py-libp2p (a foreign peer for the interop tests) pins its own dependencies: its own virtualenv.
PYLIBP2P_VENV := .venv-libp2p
PYLIBP2P_VERSION := 0.8.1
STAMP_PYLIBP2P := $(PYLIBP2P_VENV)/.installed
# Synapse (the reference homeserver the homeserver benchmark compares with): its own virtualenv.
SYNAPSE_VENV := .venv-synapse
SYNAPSE_VERSION := 1.163.2
STAMP_SYNAPSE := $(SYNAPSE_VENV)/.installed

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "teia needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@command -v cargo >/dev/null || { echo "teia needs a Rust toolchain (cargo)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_DEPS): pyproject.toml | $(PY)
	bash scripts/bootstrap-system.sh
	$(BIN)/pip install --quiet 'maturin>=1.7,<2'
	$(BIN)/maturin develop --release --extras dev
	touch $@ $(STAMP_BUILT)

$(STAMP_BUILT): $(RUST_SOURCES) $(STAMP_DEPS)
	$(BIN)/maturin develop --release --skip-install
	touch $@

$(STAMP_PYLIBP2P): | $(PY)
	$(PYTHON) -m venv $(PYLIBP2P_VENV)
	$(PYLIBP2P_VENV)/bin/pip install --quiet --upgrade pip
	$(PYLIBP2P_VENV)/bin/pip install --quiet 'libp2p==$(PYLIBP2P_VERSION)'
	touch $@

$(STAMP_SYNAPSE): | $(PY)
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	echo '*' > $(SYNAPSE_VENV)/.gitignore
	$(SYNAPSE_VENV)/bin/pip install --quiet --upgrade pip
	$(SYNAPSE_VENV)/bin/pip install --quiet 'matrix-synapse==$(SYNAPSE_VERSION)'
	touch $@

.PHONY: dev
dev: $(STAMP_BUILT) ## create .venv, install dev dependencies, build the extension

.PHONY: test
test: dev $(STAMP_PYLIBP2P) ## run cargo test and pytest
	cargo test --locked --manifest-path rust/Cargo.toml
	TEIA_PYLIBP2P_PYTHON=$(abspath $(PYLIBP2P_VENV))/bin/python $(BIN)/pytest $(PYTEST_ARGS)

.PHONY: demo
demo: dev ## run the demo on embedded defaults
	$(BIN)/teia demo

.PHONY: bench
bench: dev $(STAMP_PYLIBP2P) $(STAMP_SYNAPSE) ## run the benchmarks (pytest-benchmark)
	TEIA_SYNAPSE_PYTHON=$(abspath $(SYNAPSE_VENV))/bin/python $(BIN)/pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops,rounds $(PYTEST_ARGS)

.PHONY: lint
lint: dev ## ruff, mypy, cargo fmt --check, cargo clippy -D warnings, stubtest of _native.pyi
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo clippy --locked --all-targets --features python -- -D warnings
	$(PY) -m mypy.stubtest teia._native

.PHONY: fmt
fmt: dev ## format Python and Rust sources
	$(BIN)/ruff format $(PY_DIRS)
	$(BIN)/ruff check --fix $(PY_DIRS)
	cargo fmt --all

.PHONY: wheel
wheel: dev ## build an abi3 wheel under dist/
	$(BIN)/maturin build --release --out dist

.PHONY: wheelhouse
wheelhouse: wheel ## the teia wheel and its dependencies' wheels in dist/wheelhouse.tar (for Ansible)
	rm -rf dist/wheelhouse
	$(BIN)/pip wheel --quiet --wheel-dir dist/wheelhouse "$$(ls -t dist/teia-*.whl | head -1)"
	tar -C dist/wheelhouse --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf dist/wheelhouse.tar .

.PHONY: clean
clean: ## remove build outputs and the virtualenv
	rm -rf $(VENV) $(PYLIBP2P_VENV) $(SYNAPSE_VENV) target dist python/teia/*.so .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks

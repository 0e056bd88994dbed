# One command for the quickstart, one for the tests; each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup quickstart test test-fast lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

## The main job: MoCo on bundled digits with 2 Ray workers, then kNN / linear eval / detection vs random init.
quickstart: $(STAMP)
	$(VENV)/bin/mocolab quickstart

## The whole test suite (what .ci/run runs).
test: $(STAMP)
	$(PY) -m pytest -q -ra

## The default suite without tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

## Style: ruff's checks and its formatter, configured in pyproject.toml (what .ci/run runs before the tests).
lint: $(STAMP)
	$(VENV)/bin/ruff check platform tests
	$(VENV)/bin/ruff format --check platform tests

clean:
	rm -rf reports .pytest_cache

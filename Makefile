.PHONY: setup demo test lint bench clean
VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/sidecarless lab down --lab demo
	$(VENV)/bin/sidecarless lab test examples/billing-api examples/two-nodes --lab demo

test: setup lint
	$(PY) -m pytest -q --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

bench: setup
	$(VENV)/bin/sidecarless bench datapath
	$(VENV)/bin/sidecarless bench control-plane
	$(VENV)/bin/sidecarless bench churn

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

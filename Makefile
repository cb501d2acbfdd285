.PHONY: setup demo test lint clean
VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/sidecarless lab down --name demo
	$(VENV)/bin/sidecarless lab test examples/billing-api --name demo

test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: setup demo test lint bench clean lock image test-image
VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/sidecarless lab down --lab demo
	$(VENV)/bin/sidecarless lab test examples/billing-api examples/two-nodes --lab demo

test: setup lint
	$(PY) -m pytest -q --durations=15 tests --ignore=tests/image

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

bench: setup
	$(VENV)/bin/sidecarless bench datapath
	$(VENV)/bin/sidecarless bench control-plane
	$(VENV)/bin/sidecarless bench churn

# Every Python package, transitive ones included, at one version: `make setup`, CI and the Dockerfile install
# with it as constraints. Run after changing a dependency in pyproject.toml, and commit the result.
lock: setup
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra lab --extra bench --python-version 3.11 \
		--python-platform x86_64-manylinux_2_31 --annotation-style line --no-header --quiet -o requirements-lock.txt.new
	{ echo "# Written by \`make lock\` (uv pip compile) from pyproject.toml with every extra, for CPython 3.11 on x86_64"; \
	  echo "# Linux. Installed as constraints: pip install -c requirements-lock.txt -e '.[dev,lab,bench]'."; \
	  cat requirements-lock.txt.new; } > requirements-lock.txt && rm requirements-lock.txt.new

# The DaemonSet's image, built here (podman, mmdebstrap: no registry), and its two containers run in the lab.
image: setup
	@bash scripts/image.sh

test-image: image
	SIDECARLESS_IMAGE=localhost/sidecarless:$$($(PY) -c 'import sidecarless; print(sidecarless.__version__)') \
		$(PY) -m pytest -q tests/image

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick docs lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fused_dynamics.demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

test-quick: $(STAMP)  # the suite without the tests marked slow (they run in make test and CI)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 -m "not slow"

docs: $(STAMP)  # the documentation site, into site/
	$(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs site

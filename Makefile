# Developer entry points.  `make test` is the whole suite, as CI runs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test lint demo interop bench bench-smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check src tests bench demo
	$(PY) -m mypy
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests bench demo
	$(PY) -m mypy

demo: $(VENV)/.installed
	$(PY) demo/run.py

# Run the interop matrix against the installed peers and regenerate docs/interop.md.
interop: $(VENV)/.installed
	rm -rf build/interop
	$(PY) -m pytest -q -n 2 tests/peers/interop $(PYTEST_ARGS)
	$(PY) tests/peers/interop_report.py

bench: $(VENV)/.installed
	$(PY) bench/run.py

bench-smoke: $(VENV)/.installed
	$(PY) bench/run.py --smoke

clean:
	rm -rf $(VENV) build src/*.egg-info

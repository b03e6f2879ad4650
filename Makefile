# Developer entry points.  `make test` is the whole suite, as CI runs it.
# Some tests run programs as the unprivileged user `mail` (Postfix's pipe
# never runs as root), and that user must be able to execute the venv's
# Python.  An interpreter under /root usually is not, so as root prefer the
# system Python when it is new enough.
SYSTEM_PYTHON := $(shell [ "$$(id -u)" = 0 ] && /usr/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && echo /usr/bin/python3)
PYTHON ?= $(or $(SYSTEM_PYTHON),python3)
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

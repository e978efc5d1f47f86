# The two commands of the README's quick start. Each does all of its own set-up on a fresh machine.
#   make run   – a limited center's node: .venv with .[cpu] (no torch), then the node with the embedded models
#   make test  – the full suite: .venv with torch==2.13.0 first (the CPU wheel on this machine's disk), then
#                .[cpu,train,dev]
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: run test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-cpu: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[cpu]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,train,dev]'
	touch $@ $(VENV)/.installed-cpu

run: $(VENV)/.installed-cpu
	$(VENV)/bin/fedlesion --help

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-cpu .pytest_cache

# The two commands of the README's quick start. Each does all of its own set-up on a fresh machine.
#   make run   – a limited center's node: .venv with .[cpu] (no torch), then the node with the embedded models
#   make test  – the full suite: .venv with torch==2.13.0 first (the CPU wheel on this machine's disk), then
#                .[cpu,train,dev]
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: run test default-models clean

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

# The embedded default models: trained on synthetic data on the CPU, exported with ONNX parity, signed with the
# demo key, then scored on the real shared test cases (n = 1 per task). CI never runs this.
DEMO_KEY := models/demo-keys/DEMO_PRIVATE_KEY_DO_NOT_TRUST.pem
DEFAULT_MODELS_BUILD := build/default-models
STROKE_EPOCHS ?= 24
MS_EPOCHS ?= 6

default-models: $(VENV)/.installed-test
	$(VENV)/bin/fedlesion train --task stroke-dwi-adc --data synthetic:30 --seed 1 --epochs $(STROKE_EPOCHS) \
		--out $(DEFAULT_MODELS_BUILD)/stroke-dwi-adc
	$(VENV)/bin/fedlesion train --task ms-flair --data synthetic:12 --seed 1 --epochs $(MS_EPOCHS) \
		--out $(DEFAULT_MODELS_BUILD)/ms-flair
	rm -rf models/defaults $(DEFAULT_MODELS_BUILD)/registry
	# Stroke: the epoch with the best synthetic validation Dice. MS: 6 CPU epochs never reach a non-zero validation
	# Dice after epoch 1, whose "best" model marks most of the brain, so the last epoch ships instead.
	for pair in stroke-dwi-adc:best ms-flair:last; do \
		task=$${pair%%:*}; checkpoint=$${pair##*:}; \
		$(VENV)/bin/fedlesion export $(DEFAULT_MODELS_BUILD)/$$task/$$checkpoint.pt --key $(DEMO_KEY) --version 1 \
			--registry $(DEFAULT_MODELS_BUILD)/registry --out models/defaults/$$task \
			--description "trained on synthetic data; not for clinical use" || exit 1; \
	done
	$(VENV)/bin/python benchmarks/default_models.py

clean:
	rm -rf $(VENV) .venv-cpu .pytest_cache

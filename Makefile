# megafox — the commands users type. `make test` and `make demo` set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast preprocess data-index demo demo-clean clean bench

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e ".[eval,trackers]" torch==$(TORCH_VERSION)  # + `megafox eval`'s and the trackers' extras; torch stays pinned
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q --durations=40 tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info

# Tokenizer (if the plan asks for one and it is missing) + every stage of the data plan
# into data/<stage>/ indexed shards and a blend.json per stage.
DATA_PLAN ?= configs/data/fox1.yaml
preprocess: venv
	$(PY) -m data_prep.plan --plan $(DATA_PLAN)

# After preprocess: build a stage's megatron sample indices ahead of training, in one process
# (the trainer's ranks then only memory-map them; megafox/data/build_index.py).
CONFIG ?= configs/train/fox1_1p6b.yaml
STAGE ?= stage1
data-index: venv
	$(PY) -m megafox.data.build_index --config $(CONFIG) --stage $(STAGE)

# The whole pipeline on a real corpus on this machine (see demo/run.sh); reruns reuse finished steps.
demo: venv
	bash demo/run.sh

demo-clean:
	rm -rf demo_out

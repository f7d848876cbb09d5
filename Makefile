# `make run`: set up, run the pipeline (dvc repro), then serve the champion model on port 3000.
# `make test`: set up, run the whole test suite.
# `make cifar10`: set up, run the CIFAR-10 pipeline (cifar10/, its own params.yaml), then serve its champion.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DATA_MIRROR ?=
PORT ?= 3000
# dvc.yaml's commands run `python -m pipeline.<stage>`: make that the project's interpreter
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test install pipeline serve bench clean cifar10 cifar10-pipeline serve-cifar10

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

.dvc:
	test -d .git || git init -q
	$(BIN)/dvc init -q || $(BIN)/dvc init -q --no-scm
	$(BIN)/dvc config core.autostage true

pipeline: install .dvc
	$(BIN)/dvc repro

run: pipeline
	$(MAKE) serve

serve: install
	$(BIN)/bentoml serve service.service:Classifier --host 0.0.0.0 --port $(PORT)

# CIFAR-10: the same stages (cifar10/dvc.yaml links to ./dvc.yaml) with cifar10/params.yaml; outputs under
# cifar10/, runs and versions in the same MLflow store, under CIFAR-10's own registered model
cifar10-pipeline: install .dvc
	$(BIN)/dvc repro cifar10/dvc.yaml

cifar10: cifar10-pipeline
	$(MAKE) serve-cifar10

serve-cifar10: install
	CLASSIFIER_MODEL_NAME=$$($(BIN)/python -c "from pipeline.params import load_params; \
	  print(load_params('cifar10/params.yaml').promote.registered_model)") \
	  $(BIN)/bentoml serve service.service:Classifier --host 0.0.0.0 --port $(PORT)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf outputs checkpoints data/prepared

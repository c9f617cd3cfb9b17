# DiverseDiT reproducibility suite.
#   make reproduce   set up, run the smoke tier of every table (CPU), render the HTML report
#   make test        set up, lint, run the tests (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
# Torch is installed first so clusters can pick their own build: `make setup TORCH="torch==2.x"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= train,eval,notebooks,dev
BIN    := $(VENV)/bin

.PHONY: setup test lint format reproduce report bench clean

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

reproduce: setup  # the report is rendered even when a row failed; the exit status keeps the failure
	$(BIN)/diversedit reproduce --tier smoke; status=$$?; $(BIN)/diversedit report && exit $$status

report: setup
	$(BIN)/diversedit report

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/diversedit bench --device cpu --sizes tiny --out results/bench/cpu.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

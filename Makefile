# DiverseDiT reproducibility suite.
#   make reproduce   set up, run the smoke tier of every table (CPU), render the HTML report
#   make test        set up, lint, run the tests (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
# Torch is installed first so clusters can pick their own build: `make setup TORCH="torch==2.x"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= train,eval,notebooks,dev
BIN    := $(VENV)/bin

.PHONY: setup test lint format reproduce report bench gpu-check clean

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
	$(BIN)/diversedit bench --device cpu --sizes tiny --out results/bench/local/$$(date +%F)_cpu_tiny.json

# On a GPU node, with an environment that has the package's dependencies (GPU_PY): the CUDA
# tests and the benchmark records for results/bench/. Each part has its own time limit, so a
# hang costs one part, not the rest; the newest run first. Earlier records hold the eager
# steps, the parameter update and Inception; `make gpu-check` times what is open: the fused
# parameter update as Triton kernels against the library one at XL/2, the loss implementations
# (the Triton kernels alone and inside the compiled loss), compiled steps of SiT and of the
# diversity loss with the Inductor statistics, then with the Triton statistics and update, the
# sampler (fp32 with TF32 as `diversedit sample` runs it, IEEE fp32, bf16), the update compiled
# by Inductor (at B/2: its compilation takes about a second per parameter tensor, 131 there,
# 291 at XL/2) and the compiled sampling network against the eager one. The parts' limits add
# up to 18 minutes, more than one 10-minute device call, so the last parts (the compiled
# sampler, then CUDA tests an earlier session ran) may be cut.
GPU_PY  ?= $(BIN)/python
GPU_OUT ?= results/bench/gpu-check
BENCH   := $(GPU_PY) -m diversedit bench --device cuda --batch 32 --steps 10
gpu-check:
	mkdir -p $(GPU_OUT)
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $(GPU_OUT)/gpu.txt
	-timeout 120 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "triton or update" \
		tests/test_gpu.py 2>&1 | tee $(GPU_OUT)/tests_new.log
	-timeout 60 $(BENCH) --sizes XL/2 --parts optimizer --update triton \
		--out $(GPU_OUT)/xl_update_triton.json
	-timeout 60 $(BENCH) --sizes XL/2 --parts loss --profile --out $(GPU_OUT)/xl_loss.json
	-timeout 200 $(BENCH) --sizes XL/2 --variants sit,diversity \
		--compile --parts train --profile --out $(GPU_OUT)/xl_compiled.json
	-timeout 100 $(BENCH) --sizes XL/2 --variants diversity --diversity-triton --update triton \
		--compile --parts train --profile --out $(GPU_OUT)/xl_compiled_triton.json
	-timeout 90 $(BENCH) --sizes XL/2 --parts sampler --out $(GPU_OUT)/xl_sampler.json
	-timeout 150 $(BENCH) --sizes B/2 --parts optimizer --update compiled \
		--out $(GPU_OUT)/b2_update.json
	-timeout 180 $(BENCH) --sizes XL/2 --parts sampler --compile \
		--out $(GPU_OUT)/xl_sampler_compiled.json
	-timeout 120 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "(cuda or gpu) and not (triton or update)" \
		tests/test_gpu.py tests/test_diversity.py 2>&1 | tee $(GPU_OUT)/tests.log

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

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
# hang costs one part, not the rest; the newest questions first (NOTES entry 28). The GPU's
# clocks, power and temperature are logged twice a second meanwhile (clocks.csv; the logger
# stops at the end, or after 900 s if the run is cut). First the CUDA test of the trainer's
# defaults (the Triton statistics and update, compiled sampling); then XL/2 compiled steps
# with those defaults, with each step's host time: the long residuals cost 8% more kernel time
# but 24% more wall clock in session 15, a GPU left idle, each time timed after SiT in the same
# process and after SiT's profile, which may have left CUPTI attached (NOTES entry 37), so now
# round-robin, all rounds before any profile (`--interleave`: a GPU warming up or throttling
# slows every variant alike; `diversedit overhead` reads the rounds back; `--profile` finds
# where in the step the GPU idles and what the host ran meanwhile, `gpu_idle` in the JSON);
# session 15's sequential profiled run again, now that profiles detach CUPTI when they end;
# MFU at the release's global batch 256 on one GPU (64 × 4 accumulated, the update's fixed
# cost spread over 256 images); the steps as CUDA graphs (`reduce-overhead`), which take the
# host out of the step, and with Inductor's C++ wrapper (`TORCHINDUCTOR_CPP_WRAPPER=1`,
# recorded in the JSON's machine block), which shortens it; the other CUDA tests (passed in
# session 15) last. The parts' limits add up to 960 s, more than one 10-minute device call,
# so the last may be cut.
GPU_PY  ?= $(BIN)/python
GPU_OUT ?= results/bench/gpu-check
BENCH   := $(GPU_PY) -m diversedit bench --device cuda --batch 32 --steps 10
DEFAULTS := --compile --diversity-triton --update triton
CLOCKS  := timestamp,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu
gpu-check:
	mkdir -p $(GPU_OUT)
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $(GPU_OUT)/gpu.txt
	timeout 900 nvidia-smi --format=csv -lms 500 --query-gpu=$(CLOCKS) \
		> $(GPU_OUT)/clocks.csv 2>&1 & echo $$! > $(GPU_OUT)/clocks.pid
	-timeout 150 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "digits" \
		tests/test_gpu.py 2>&1 | tee $(GPU_OUT)/tests_defaults.log
	-timeout 150 $(BENCH) --sizes XL/2 --variants sit,long_skip,diversedit $(DEFAULTS) \
		--interleave --parts train --profile --out $(GPU_OUT)/xl_compiled_triton.json
	-timeout 110 $(BENCH) --sizes XL/2 --variants sit,long_skip $(DEFAULTS) --no-interleave \
		--parts train --profile --out $(GPU_OUT)/xl_sequential_profiled.json
	-timeout 130 $(BENCH) --sizes XL/2 --variants sit,diversedit --batch 64 --accum 4 \
		--steps 5 $(DEFAULTS) --parts train --out $(GPU_OUT)/xl_b64x4.json
	-timeout 150 $(BENCH) --sizes XL/2 --variants sit,long_skip,diversedit $(DEFAULTS) \
		--compile-mode reduce-overhead --parts train --out $(GPU_OUT)/xl_cudagraphs.json
	-TORCHINDUCTOR_CPP_WRAPPER=1 timeout 120 $(BENCH) --sizes XL/2 --variants sit,long_skip \
		$(DEFAULTS) --parts train --out $(GPU_OUT)/xl_cpp_wrapper.json
	-timeout 150 $(GPU_PY) -m pytest -q -p no:cacheprovider -k "(cuda or gpu) and not digits" \
		tests/test_gpu.py tests/test_diversity.py 2>&1 | tee $(GPU_OUT)/tests.log
	-kill $$(cat $(GPU_OUT)/clocks.pid) && rm $(GPU_OUT)/clocks.pid

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

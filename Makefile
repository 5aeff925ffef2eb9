# autoseg: two commands on a fresh clone
#   make demo   - the whole pipeline on generated example data
#   make test   - the test suite
# Each installs what it needs first (an idempotent virtual environment in .venv).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.autoseg-installed
TORCH_VERSION ?= 2.13.0
# Where a CPU-only torch comes from when no local wheel is found (a bare `pip install torch`
# pulls a multi-GB CUDA build on Linux).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo_work
PYTEST_ARGS ?=

.PHONY: install test demo lint bench gpu-check clean help

help:
	@echo "make demo    run every stage end to end on a generated example CT dataset"
	@echo "make test    run the test suite"
	@echo "make lint    ruff"
	@echo "make bench   benchmarks on the example CT dataset (writes bench_results.json)"
	@echo "make gpu-check  on a CUDA GPU: memory estimate, AMP speed, data wait, inference, bf16 Dice (writes gpu_check.json)"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e ".[dev,onnx,dicom,distributed]"
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check autoseg tests

# The demo runs on the CPU in minutes: the small `cpu` preset and the 2D configuration, ten minutes
# of training (--time-budget fits the schedule to this machine's speed), the fast prediction preset.
# 16 training cases: 8 hold a dozen lesions, too few to learn unseen ones from, and with the preset's
# batch cap more cases cost no training time. 8 held-out cases (2 without lesions): with 3, one false
# positive in the one lesion-free case moved the printed lesion Dice by a third.
# A GPU plan (no --preset) is what real datasets deserve.
demo: install
	@rm -rf $(DEMO_DIR)
	$(BIN)/autoseg make-example $(DEMO_DIR)/raw --kind ct --num-cases 16 --num-test-cases 8
	$(BIN)/autoseg validate $(DEMO_DIR)/raw
	$(BIN)/autoseg plan $(DEMO_DIR)/raw --work $(DEMO_DIR)/work --preset cpu --configurations 2d --explain
	$(BIN)/autoseg preprocess $(DEMO_DIR)/work
	$(BIN)/autoseg train $(DEMO_DIR)/work -c 2d -f all --time-budget 10m --val-iters 2
	$(BIN)/autoseg predict $(DEMO_DIR)/work -i $(DEMO_DIR)/raw/imagesTs -o $(DEMO_DIR)/predictions -c 2d -f all --fast --checkpoint latest
	$(BIN)/autoseg evaluate $(DEMO_DIR)/predictions $(DEMO_DIR)/raw/labelsTs --dataset-json $(DEMO_DIR)/raw/dataset.json

bench: install
	$(BIN)/autoseg benchmark --example ct -o bench_results.json

# Under 10 minutes on one CUDA GPU; exits 1 when a check fails. Without CUDA it says so and exits 0.
gpu-check: install
	$(BIN)/python tests/benchmarks/gpu_check.py --output gpu_check.json

clean:
	rm -rf $(DEMO_DIR) autoseg_work .pytest_cache gpu_check.json

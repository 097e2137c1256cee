# The README's commands. Each target sets up .venv (and torch, if missing) before it runs.
#   make demo   set up, build, train a small RT-DETR with the kernels on generated scenes (~4 min CPU): mAP, PNG, parity, timings in demo-output/
#   make test   set up, build, run the whole test suite (Triton kernels under the interpreter when no GPU)
#   make bench  set up, build, run the microbenchmarks
#   make gpu    on a GPU machine: build, test on CUDA, compute-sanitizer, benchmarks, record results

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TRANSFORMERS_SPEC ?= transformers==5.23.0
# The codebases we patch and the runtimes we export to, pinned (integration and export tests).
INTEGRATION_DEPS ?= ultralytics==8.4.190 rfdetr==1.11.2 kernels==0.17.2 onnx==1.23.2 onnxruntime==1.31.1 onnxscript==0.7.2 openvino==2026.4.1
TEST_DEPS ?= numpy ninja pytest pytest-benchmark hypothesis scipy $(TRANSFORMERS_SPEC) matplotlib pycocotools==2.0.11 $(INTEGRATION_DEPS)
# The CUDA toolkit root, found once by setup.py's find_cuda_home() (nvcc may be a wrapper script
# outside the toolkit, so torch's guess is wrong); empty without nvcc. Sets RTDETR_REQUIRE_CUDA_EXTENSION.
ifeq ($(origin CUDA_HOME),undefined)
CUDA_HOME := $(shell $(PYTHON) -c 'from setup import find_cuda_home; print(find_cuda_home() or "")')
endif
export CUDA_HOME
BUILD_STAMP := $(VENV)/.rtdetr-kernels-built
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: deps setup demo test bench gpu gpu-dry-run clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.deps: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(TEST_DEPS)
	touch $@

$(BUILD_STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The venv with torch and the test dependencies, nothing built (CI's second lane: another VENV and versions).
deps: $(VENV)/.deps

setup: $(BUILD_STAMP)

demo: setup
	$(PY) -m rtdetr_kernels demo --out demo-output $(DEMO_ARGS)

# The build test must fail (not skip) when the extension, or its CUDA kernels where nvcc exists, did not build.
test: setup
	RTDETR_REQUIRE_EXTENSION=1 RTDETR_REQUIRE_CUDA_EXTENSION=$(if $(CUDA_HOME),1,0) $(PY) -m pytest tests -q -rs --durations=40

bench: setup
	$(PY) -m pytest bench -q

# The GPU machine has no network and its python already has torch: no .venv setup here. The core (build,
# tests on CUDA, compute-sanitizer) and the benchmarks are separate commands there: GPU_SUITE_ARGS=--core-only
# and GPU_SUITE_ARGS=--bench-only, each with the same --out.
gpu:
	$(PYTHON) bench/gpu_suite.py $(GPU_SUITE_ARGS)

# The commands `make gpu` would run, with their deadlines; needs torch, no GPU, no build.
gpu-dry-run: $(VENV)/.deps
	$(PY) bench/gpu_suite.py --dry-run $(GPU_SUITE_ARGS)

clean:
	rm -rf build *.egg-info kernels/_C*.so kernels/_build_info.json $(BUILD_STAMP)

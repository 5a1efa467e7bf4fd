# One-command entry points; each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
TORCH  ?= torch==2.13.0

.PHONY: all build test test-c bench demo lint wheel clean

all: build

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" "numpy>=1.25" "safetensors>=0.4" "tqdm>=4.60" "matplotlib>=3.7" \
		"transformers>=4.40" tokenizers pillow "diffusers>=0.32" "pytest>=7" "ruff>=0.4" "setuptools>=64" wheel
	touch $@

# Editable build: the extension and (with nvcc) libdipp_cuda.so land in python_shim/diffinstruct/.
build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# C-level tests of the core under valgrind memcheck (no Python involved).
test-c:
	bash tests/c/run.sh

test: build test-c
	$(VENV)/bin/ruff check python_shim tests bench
	$(PY) -m pytest -q tests

# The main job on the built-in default: DI++ on the 2-D Gaussian mixture (about a minute),
# then samples and metrics of the EMA generator. Re-running resumes the finished run.
demo: build
	OMP_NUM_THREADS=1 $(PY) -m diffinstruct train --config examples/toy2d.toml --resume
	$(PY) -m diffinstruct sample --checkpoint runs/toy2d --out runs/toy2d/samples.png
	$(PY) -m diffinstruct eval --checkpoint runs/toy2d

bench: build
	$(PY) bench/bench.py --output BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check python_shim tests bench

wheel: $(STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info python_shim/*.egg-info python_shim/diffinstruct/*.so

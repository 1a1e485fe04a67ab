# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh .venv and (re)build the extension first, on a machine with nothing preinstalled.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export MAX_JOBS ?= 2
export TRP_KERNELS_CUDA ?= auto

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null) setup.py

.PHONY: venv build test demo paper bench clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==2.14.1" "triton==3.8.0" "torchvision==0.29.1" numpy tqdm \
		scikit-learn matplotlib pytest pytest-benchmark hypothesis ninja "setuptools>=69" wheel
	touch $@

venv: $(VENV)/.deps

# Editable install: builds trp_kernels/_C*.so in place (CUDA kernels too when nvcc and torch's CUDA allow).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -c "import trp_kernels, json; print(json.dumps(trp_kernels.backend_info(), indent=1))"
	$(PY) -m pytest -q tests

demo: build
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/trp train --model resnet20 --data digits --image-size 16 --scheme channel --energy 0.9 --nuclear 3e-4 --epochs 30 --lr 0.05 --out runs/demo --force

paper: build
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/paper_table.py

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-enable

clean:
	rm -rf build *.egg-info trp_kernels/_C*.so $(VENV)/.built

# The two commands of the README: `make demo` (the main job) and `make test` (the test suite, then the docs).
# Both create or refresh .venv and (re)build the extension first, on a machine with nothing preinstalled.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PINS   := requirements/pinned.txt
# [build-system] requires of pyproject.toml: installed before the project, whose extension is built with
# --no-build-isolation against the torch installed here.
BUILD_REQS := "setuptools>=69" wheel ninja torch
export MAX_JOBS ?= 2
export TRP_KERNELS_CUDA ?= auto

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.txt' 2>/dev/null) setup.py

.PHONY: build test docs demo demo-record paper bench compat clean

# The project's own dev and docs extras at the versions of $(PINS) (the one place that pins them), as an editable
# install: trp_kernels/_C*.so is built in place (CUDA kernels too when nvcc and torch's CUDA allow).
$(VENV)/.built: pyproject.toml $(PINS) $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(PINS) $(BUILD_REQS)
	$(PIP) install -q -c $(PINS) --no-build-isolation -e ".[dev,docs]"
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m ruff check .
	$(PY) -c "import trp_kernels, json; print(json.dumps(trp_kernels.backend_info(), indent=1))"
	$(PY) -m pytest -q tests
	$(MAKE) docs

# The documentation site (mkdocs.yml, docs/) into site/, strict: a warning, a broken link or a missing reference
# fails. NO_MKDOCS_2_WARNING silences the theme's banner about its successor.
docs: build
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The main job; `make demo-record` runs the same command and records its output in results/demo.json, from which
# benchmarks/pages.py writes the README's block and docs/benchmarks/demo.md.
DEMO_ARGS := train --model resnet20 --data digits --image-size 16 --scheme channel --energy 0.9 --nuclear 3e-4 --epochs 30 --lr 0.05 --out runs/demo --force
demo: build
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/trp $(DEMO_ARGS)

demo-record: build
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/record_run.py --out results/demo.json -- $(VENV)/bin/trp $(DEMO_ARGS)
	$(PY) benchmarks/pages.py

paper: build
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/paper_table.py

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-enable

# The oldest supported stack ($(COMPAT_PINS): the GPU machine's) in its own environment, C++ CPU kernels
# only unless COMPAT_CUDA=auto. It builds and tests a copy of the working tree ($(COMPAT)/src, installed
# editable there): the tree's own trp_kernels/_C*.so, built against .venv's torch, is neither rebuilt
# nor imported, also by tests that run scripts of the tree. Not part of `make test`.
COMPAT      := .venv-compat
COMPAT_PINS := requirements/compat-torch2.11.txt
COMPAT_CUDA ?= 0
compat: export TRP_KERNELS_CUDA = $(COMPAT_CUDA)
compat:
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q -c $(COMPAT_PINS) $(BUILD_REQS)
	rm -rf $(COMPAT)/src && mkdir $(COMPAT)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(COMPAT)/src
	cd $(COMPAT)/src && ../bin/pip install -q -c $(COMPAT_PINS) --no-build-isolation -e ".[dev]"
	cd $(COMPAT)/src && ../bin/python -c "import json, trp_kernels as t; print(json.dumps(t.backend_info()))"
	cd $(COMPAT)/src && ../bin/python -m pytest -q tests

clean:
	rm -rf build *.egg-info trp_kernels/_C*.so $(VENV)/.built site

# The few commands people type. Each target sets up .venv from pyproject.toml by itself.
#   make test       CPU test suite (Triton kernels run in the interpreter)
#   make reproduce  GPU: paper sweeps + figures; no GPU: smoke sweep in the interpreter + figures
#                   rebuilt from the committed H100 results
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: test reproduce figures venv clean

venv: $(STAMP)

# A GPU machine keeps its own CUDA torch (system site packages); a CPU machine gets the CPU build
# torch==2.13.0 first, so nothing else can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
endif
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

reproduce: $(STAMP)
	$(PY) -m experiments.reproduce

figures: $(STAMP)
	$(PY) -m analysis.figures --results results/h100 --out results/figures

clean:
	rm -rf $(VENV) outputs multirun results/smoke

# The few commands people type. Each target sets up .venv from pyproject.toml by itself.
#   make test       CPU test suite (Triton kernels run in the interpreter)
#   make reproduce  GPU: paper sweeps + figures; no GPU: smoke sweep in the interpreter + figures
#                   rebuilt from the committed H100 and H200 results
#   make figures    figures and tables rebuilt from the committed results only
#   make notebook   notebooks/analysis.ipynb in JupyterLab
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# What `make test` hands pytest; PYTEST_RC=<file> also writes pytest's own exit code there (make
# itself exits 2 on any failure, so .ci/run reads 5, "no tests collected", from that file).
PYTEST_ARGS ?= tests
PYTEST_RC ?=
# 1 on a machine with an NVIDIA GPU (nvidia-smi lists one); `make HAS_GPU=1 -n venv` shows the GPU set-up.
HAS_GPU ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
FLASHINFER_HINT := FlashInfer not installed (no network?): its baselines give skipped rows; with a network: $(VENV)/bin/pip install -e '.[flashinfer]'

.PHONY: test reproduce figures notebook venv clean

venv: $(STAMP)

# A GPU machine keeps its own CUDA torch (system site packages) and gets the `flashinfer` extra the GPU
# sweeps' baselines need (without a network: one line says how to add it later, and the set-up goes
# on); a CPU machine gets the CPU build torch==$(TORCH_VERSION) first (from PyTorch's CPU wheel index
# when it answers, else the default index: scripts/install_torch_cpu.sh), so nothing else can pull a
# multi-GB CUDA build.
$(STAMP): pyproject.toml
ifeq ($(HAS_GPU),1)
	@echo "GPU found: installing the project with its dev and flashinfer extras. FlashInfer JIT-compiles its kernels with nvcc on first use: the first GPU sweep spends several minutes building them, once."
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e '.[dev,flashinfer]' || echo "$(FLASHINFER_HINT)"
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/install_torch_cpu.sh $(PY) $(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
endif
	touch $(STAMP)

test: $(STAMP)
	@echo "$(PY) -m pytest -q $(PYTEST_ARGS)"; rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	$(if $(PYTEST_RC),echo $$rc > '$(PYTEST_RC)';) exit $$rc

reproduce: $(STAMP)
	$(PY) -m experiments.reproduce

# Committed rows -> figures: the H100's into results/figures/, the H200's into results/figures/h200/.
figures: $(STAMP)
	$(PY) -m analysis.figures --results results/h100 --out results/figures
	$(PY) -m analysis.figures --results results/h200 --out results/figures/h200

# The analysis notebook in JupyterLab (installs the `notebook` extra first). Headless, with what
# `make test` installs: $(VENV)/bin/jupyter execute notebooks/analysis.ipynb
notebook: $(STAMP)
	$(PY) -m pip install -q -e '.[notebook]'
	$(VENV)/bin/jupyter lab notebooks/analysis.ipynb

clean:
	rm -rf $(VENV) outputs multirun results/smoke

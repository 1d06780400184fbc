# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
SHARED ?= ../shared/data
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo test test-slow test-faults bench clean

venv: $(STAMP)

# torch first, pinned to the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA
# build), then the project with its extras under the tested constraints; then check pip kept torch.
$(STAMP): setup.cfg constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'pip replaced torch: ' + v)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hiceller.demo --out $(DEMO) --shared $(SHARED)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-faults: $(STAMP)
	$(PY) -m pytest -q -m faults

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO) .pytest_cache

# Set-up and the two Quickstart commands: `make bench` (main job) and `make test` (tests).
# Everything lives in a virtualenv (.venv) with the CPU build of torch 2.13.0.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check
SOURCES = $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu) setup.py pyproject.toml

.PHONY: setup build bench bench-full test test-fast info clean

setup: $(VENV)/.deps $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q numpy pytest hypothesis pytest-benchmark expecttest "pytorch-metric-learning>=2.9" \
		scikit-learn tqdm matplotlib "triton==3.8.0"
	touch $@

# The extension is compiled against the venv's torch, hence --no-build-isolation.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

info: setup
	$(PY) -m structloss_fast info

bench: setup
	$(PY) -m structloss_fast bench $(ARGS)

bench-full: setup
	$(PY) -m structloss_fast bench --full $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf build structloss_fast/_C*.so *.egg-info

# Set-up and the two Quickstart commands: `make bench` (main job) and `make test` (tests).
# Everything lives in a virtualenv (.venv) with the CPU build of torch 2.13.0.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check
SOURCES = $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu) setup.py pyproject.toml

.PHONY: setup build bench bench-full test test-fast info clean gpu-check gpu-wheels

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

# `make gpu-check`: the whole GPU side in one command (scripts/gpu_check.py; results in
# gpu-check-results/<time>/, last line "N passed, N failed"). On a machine without a GPU it is
# the dry run that CI runs. It uses the venv when there is one, else the machine's python3 (a
# GPU image with torch and triton, no network: nothing is installed from the network).
GPU_WHEELS ?= gpu_wheels
GPU_PY     ?= $(if $(wildcard $(PY)),$(PY),python3)
# The peers of the GPU benchmark, and what they and the test run import that a bare GPU image
# may lack; each wheel is optional (a peer without its wheel is reported absent).
GPU_PEERS   = pytorch-metric-learning==2.9.0 liger-kernel==0.8.5 cut-cross-entropy inf-cl==1.2.1
GPU_SUPPORT = tqdm scipy scikit-learn hypothesis sortedcontainers attrs expecttest pytest pluggy iniconfig ninja

gpu-check:
	$(GPU_PY) scripts/gpu_check.py --wheels $(GPU_WHEELS) $(ARGS)

# Downloads the wheels (Python 3.12, Linux x86-64) for the GPU machine; needs the network.
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	for w in $(GPU_PEERS) $(GPU_SUPPORT); do \
		$(GPU_PY) -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --no-deps -d $(GPU_WHEELS) "$$w" \
			|| echo "gpu-wheels: $$w not fetched (optional: gpu-check reports it absent)"; \
	done

clean:
	rm -rf build structloss_fast/_C*.so *.egg-info

#!/usr/bin/env bash
# Builds the extension with its CUDA kernels against torch 2.14.1 (the CUDA 13.0 build) and
# checks that the library loads and that every op implemented in csrc/cuda/*.cu has a CUDA
# kernel registered. Needs a CUDA 13.0 toolkit, no GPU. The build happens in a copy of the
# tracked sources, so the CPU build in the checkout is left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
VENV=${CUDA_VENV:-.venv-cuda}
case "$VENV" in /*) ;; *) VENV="$repo/$VENV" ;; esac
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel ninja
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" numpy

if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  real=""
  if [ -n "$nvcc_path" ]; then
    # On these machines nvcc on PATH is a wrapper script that names the toolkit's nvcc.
    real=$(grep -ao '/[^ "]*/bin/nvcc' "$nvcc_path" | head -n 1 || true)
    [ -n "$real" ] || real=$(readlink -f "$nvcc_path")
  fi
  for cand in "${real:+$(dirname "$(dirname "$real")")}" /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ]; then CUDA_HOME=$cand; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no CUDA toolkit found (set CUDA_HOME)"; exit 1; }
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
echo "CUDA_HOME=$CUDA_HOME; $("$CUDA_HOME/bin/nvcc" --version | tail -n 1); torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

src=$(mktemp -d)
git ls-files -z | xargs -0 cp --parents -t "$src"
# Hopper (the GPU this package is tuned for); a user's build picks its own TORCH_CUDA_ARCH_LIST.
(cd "$src" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .)

cd /
"$VENV/bin/python" - "$repo/csrc/cuda" <<'PY'
import glob
import re
import sys

import torch

import structloss_fast
from structloss_fast import _ext

assert "site-packages" in structloss_fast.__file__, structloss_fast.__file__
assert _ext.extension_loaded(), _ext.extension_error()
ops = sorted({name for path in glob.glob(sys.argv[1] + "/*.cu")
              for name in re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', open(path).read())})
assert ops, "no CUDA ops found in csrc/cuda"
missing = [op for op in ops if not _ext.has_kernel(op, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"CUDA build OK (torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: "
      f"{torch.cuda.is_available()}): CUDA kernels registered for {', '.join(ops)}")
PY

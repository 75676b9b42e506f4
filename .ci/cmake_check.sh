#!/usr/bin/env bash
# Builds the ops library with CMake against the venv's torch (as a libtorch user would) and
# loads it with torch.ops.load_library in a process that does not import structloss_fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
prefix=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
build=$(mktemp -d)
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j 2 >"$build/build.log" 2>&1 || { tail -50 "$build/build.log"; exit 1; }
lib=$(find "$build" -name 'libstructloss_fast_ops.so' | head -n 1)
[ -n "$lib" ] || { echo "libstructloss_fast_ops.so was not built"; exit 1; }
(cd "$build" && "$OLDPWD/$PY" - "$lib" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
assert "structloss_fast" not in sys.modules
x = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
y = torch.randint(0, 4, (16,))
stats, gx, _ = torch.ops.structloss_fast.pairwise_loss(
    x, y, x, y, 0, True, 0, [0.4, 80.0], 1  # self_offset, ref_is_x, circle (ids.h), (m, gamma), grad of x
)
# The mean reduction of Circle loss from the row statistics (columns of ids.h's PairStat):
# the rows' term (SUM0 = 2) over the count of non-zero rows (COUNT0 = 3).
loss = stats[:, 2].sum() / stats[:, 3].sum().clamp_min(1)
# Dense Circle loss, written out here to check the library independently of the package.
s = x @ x.T
pos = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
neg = y[:, None] != y[None, :]
a = torch.where(pos, -80 * torch.relu(1.4 - s) * (s - 0.6), 80 * torch.relu(s + 0.4) * (s - 0.4))
z = a.masked_fill(~pos, float("-inf")).logsumexp(1) + a.masked_fill(~neg, float("-inf")).logsumexp(1)
rows = torch.where(pos.any(1) & neg.any(1), torch.nn.functional.softplus(z), torch.zeros(()))
expected = rows.sum() / (rows > 0).sum().clamp_min(1)
assert torch.allclose(loss, expected, rtol=1e-12), (loss, expected)
assert gx.shape == (1, 16, 8) and torch.isfinite(gx).all()
print(f"CMake library {sys.argv[1]}: loaded, pairwise_loss = {loss.item():.6f} (dense check {expected.item():.6f})")
PY
)

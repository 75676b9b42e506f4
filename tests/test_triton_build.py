"""Without a GPU the Triton kernels run only in the interpreter, which is lenient about types and
layouts: compile every family's configurations ahead of time for Hopper (sm_90, with Triton's
bundled ptxas), as a GPU run would, in a process without TRITON_INTERPRET. The configurations
are each family's `_triton.aot_configs()`."""
from __future__ import annotations

import pytest

from tests.helpers import compile_triton_for_hopper

_SCRIPT = r"""
import importlib

_triton = importlib.import_module("structloss_fast.{family}._triton")
for fn, signature, constexprs, num_warps in _triton.aot_configs():
    compile_sm90(fn, signature, constexprs, num_warps)
    print("compiled", fn.__name__, sorted(constexprs.items()), flush=True)
"""


@pytest.mark.parametrize("family", ["pairwise", "softmax", "seal"])
def test_triton_kernels_compile_for_hopper(family):
    pytest.importorskip("triton")
    import importlib

    expected = len(importlib.import_module(f"structloss_fast.{family}._triton").aot_configs())
    compile_triton_for_hopper(_SCRIPT.format(family=family), expected=expected, timeout=900)

"""Without a GPU the pairwise Triton kernels run only in the interpreter, which is lenient about
types and layouts: compile every kernel ahead of time for Hopper (sm_90, with Triton's bundled
ptxas), as a GPU run would, in a process without TRITON_INTERPRET."""
from __future__ import annotations

from helpers import compile_triton_for_hopper

_AOT_SCRIPT = r"""
from structloss_fast.triton import pairwise as tk


def build(fn, x_dtype, acc, loss, extra_sig, extra_consts, block):
    sig = {"X": f"*{x_dtype}", "R": f"*{x_dtype}", "LAB": "*i64", "RLAB": "*i64", "STATS": f"*{acc}"}
    sig.update(extra_sig)
    sig.update({"B": "i32", "M": "i32", "D": "i32", "stride_x": "i32", "stride_r": "i32", "p0": "fp32",
                "p1": "fp32", "p2": "fp32", "SELF_OFFSET": "i32"})
    consts = dict(LOSS=loss, BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_D=block[2],
                  PRECISION="ieee" if x_dtype in ("fp32", "fp64") else "tf32",
                  ACC=tl.float64 if acc == "fp64" else tl.float32, UPCAST=False)
    consts.update(extra_consts)
    compile_sm90(fn, sig, consts, num_warps=4)
    print("compiled", fn.__name__, loss, x_dtype, flush=True)


for loss in tk.SUPPORTED:
    for x_dtype, acc in [("bf16", "fp32")] + ([("fp32", "fp32"), ("fp64", "fp64")] if loss == tk.CIRCLE else []):
        block = (16, 32, 128) if acc == "fp64" else (64, 64, 128)
        terms = 2 if loss == tk.CONTRASTIVE else 1
        build(tk._pairwise_fwd_kernel, x_dtype, acc, loss, {}, {}, block)
        build(tk._pairwise_bwd_rows_kernel, x_dtype, acc, loss, {"W": f"*{acc}", "DX": f"*{acc}"}, {"TERMS": terms}, block)
        build(tk._pairwise_bwd_cols_kernel, x_dtype, acc, loss, {"W": f"*{acc}", "DR": f"*{acc}"},
              {"TERMS": terms, "ACCUMULATE": True}, block)
"""


def test_pairwise_triton_kernels_compile_for_hopper():
    compile_triton_for_hopper(_AOT_SCRIPT, expected=27)

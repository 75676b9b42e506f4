"""What the families' Triton kernels share: scalar parameters passed exactly, launches on the
inputs' device, the layout the kernels read, and the configuration tables they launch from.

Imported by structloss_fast/<family>/_triton.py only (it imports triton); the ahead-of-time
compile of every table entry lives in structloss_fast/_aot.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

# The most shared memory one thread block may use on sm_90 (H100/H200) with the opt-in
# carve-out: 227 KB. tests/test_triton_build.py compares every configuration with it.
SM90_SHARED_LIMIT = 227 * 1024
# ptxas' register file per thread.
MAX_REGISTERS = 255


# f64_bits XORs the bits with a signalling-NaN pattern: Triton types a Python int argument by
# its value (i32 when it fits), and without the XOR 0.0 (bits 0) would get an i32 signature of
# its own; now only signalling NaNs with this payload map to small ints, so every parameter is
# an i64 argument and one compiled specialization serves all values.
F64_KEY = 0x7FF5_55AA_0000_0000
_F64_KEY: tl.constexpr = tl.constexpr(F64_KEY)


def f64_bits(value) -> int:
    """A float as an int64 argument that `f64` turns back into the exact double. Triton types
    a Python float argument as fp32 (a float64 loss parameter would lose half its digits), and
    a tensor of parameters would cost a host-to-device copy per launch."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0] ^ F64_KEY


@triton.jit
def f64(bits):
    """The float64 that `f64_bits` packed (widened first, in case an int arrived as i32: the
    sign extension keeps its value)."""
    return (bits.to(tl.int64) ^ _F64_KEY).to(tl.float64, bitcast=True)


def rows_layout(t: torch.Tensor) -> torch.Tensor:
    """The operand as the kernels read it: rows of unit inner stride (any row stride, 0 for
    an expanded tensor included). Transposed or column-strided views are copied once."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of its first tensor argument. Triton
    launches on the *current* CUDA device; tensors on cuda:1 while cuda:0 is current would
    otherwise be read by a kernel on the wrong GPU."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a family's configuration table: the problems it takes and how it launches.

    `max_size` bounds the tiled dimension it covers (None: any size, the dimension is looped
    over in tiles); `blocks` are the kernels' BLOCK_* constexprs; `num_warps`/`num_stages` the
    launch options. Every entry is compiled ahead of time for sm_90 by the tests and checked
    against SM90_SHARED_LIMIT, so that each problem the dispatcher accepts has a launchable
    configuration."""

    dtypes: tuple                   # of "bf16", "fp16", "fp32", "fp64": the inputs it takes (same tiles)
    max_size: Optional[int]
    blocks: tuple                   # ((name, value), ...), the kernels' BLOCK_* constexprs
    num_warps: int
    num_stages: int

    def block(self, name: str) -> int:
        return dict(self.blocks)[name]

    def covers(self, size: int) -> bool:
        return self.max_size is None or size <= self.max_size

    def describe(self) -> str:
        bound = "any" if self.max_size is None else f"<= {self.max_size}"
        blocks = " ".join(f"{k}={v}" for k, v in self.blocks)
        return f"{'/'.join(self.dtypes):>9} size {bound:>7}: {blocks} warps={self.num_warps} stages={self.num_stages}"


TORCH_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return TORCH_DTYPE_NAMES[dtype]


def pick(table: tuple, dtype: torch.dtype, size: int) -> Optional[Entry]:
    """The first entry of `table` for this dtype that covers `size` (None: none does)."""
    name = TORCH_DTYPE_NAMES.get(dtype)
    for entry in table:
        if name in entry.dtypes and entry.covers(size):
            return entry
    return None


def table_rows(table: tuple) -> list[str]:
    return [e.describe() for e in table]


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One kernel specialization to compile ahead of time: what tests/test_triton_build.py and
    `make gpu-check` compile, read back and compare with the limits."""

    kernel: object                  # the @triton.jit function
    signature: dict                 # argument name -> Triton type ("*bf16", "i32", ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()           # argument names the JIT would see divisible by 16 (aligned pointers, sizes)
    label: str = ""                 # the table entry and specialization, for the report

    @property
    def name(self) -> str:
        return self.kernel.__name__

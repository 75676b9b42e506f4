"""One helper registers a loss op: its fake kernels, its autograd and its Triton twin.

A loss op `structloss_fast::<name>` comes with a recomputing backward op `<name>_backward`
(both schemas in csrc/ops.cpp, compiled kernels in csrc/cpu and csrc/cuda). `LossOp` registers
for them, in one call:
- the fake kernels (shapes only, for torch.compile and opcheck);
- the autograd formula, given the backward op of the same backend;
- an error for double backward through the backward op that names the loss (the recomputing
  backward has no derivative of its own);
- optionally the Triton twins `<name>_triton` and `<name>_backward_triton`: the same schemas,
  copied from the compiled ops, with the Python functions of a Triton module as their kernels
  (CPU tensors run them under TRITON_INTERPRET=1), and the same fake kernels and autograd.
`op(backend)` is then the op to call for a resolved backend.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from . import _ext

_LIB = torch.library.Library(_ext.NAMESPACE, "FRAGMENT") if _ext.extension_loaded() else None


def qualname(name: str) -> str:
    return f"{_ext.NAMESPACE}::{name}"


def _define_twin(name: str) -> str:
    schema = str(getattr(torch.ops.structloss_fast, name).default._schema)
    twin = f"{name}_triton"
    _LIB.define(twin + schema[schema.index("("):])
    return twin


def _lazy(module: str, attr: str) -> Callable:
    # Triton is imported on the first launch only: importing structloss_fast must not import it.
    def kernel(*args):
        return getattr(importlib.import_module(module), attr)(*args)

    kernel.__name__ = attr
    return kernel


def setup_nothing(ctx, inputs, output):
    """setup_context of an op whose backward needs nothing saved."""


def create_graph() -> bool:
    """Inside an autograd formula: whether the caller asked for a differentiable gradient
    (create_graph=True). The formulas then recompute through the backward op, so that a second
    derivative is either exact or raises, never taken from a constant the forward wrote."""
    return torch.is_grad_enabled()


class LossOp:
    """Registration and dispatch of one loss op and its twins.

    backward(ctx, backward_op, *grads) is the autograd formula of the forward op; it calls
    `backward_op` (the compiled or the Triton backward, matching the forward) when it recomputes.
    triton: (module, forward function name, backward function name) of the Triton twin.
    what: the loss family in words, for the double-backward error.
    """

    def __init__(self, name: str, *, fake: Callable, backward_fake: Callable, setup_context: Callable,
                 backward: Callable, what: str, triton: Optional[tuple[str, str, str]] = None):
        self.name = name
        self.what = what
        self._ops: dict[bool, object] = {}
        if not _ext.extension_loaded():
            return
        variants = [(False, name)]
        if triton is not None:
            module, fwd, bwd = triton
            twin = _define_twin(name)
            twin_bwd = _define_twin(f"{name}_backward")
            for key in ("CPU", "CUDA"):
                _LIB.impl(twin, _lazy(module, fwd), key)
                _LIB.impl(twin_bwd, _lazy(module, bwd), key)
            variants.append((True, twin))
        for is_triton, op_name in variants:
            bwd_name = f"{name}_backward_triton" if is_triton else f"{name}_backward"
            torch.library.register_fake(qualname(op_name))(fake)
            torch.library.register_fake(qualname(bwd_name))(backward_fake)
            backward_op = getattr(torch.ops.structloss_fast, bwd_name).default
            torch.library.register_autograd(qualname(op_name), self._formula(backward, backward_op),
                                            setup_context=setup_context)
            torch.library.register_autograd(qualname(bwd_name), self._no_double_backward,
                                            setup_context=setup_nothing)
            self._ops[is_triton] = getattr(torch.ops.structloss_fast, op_name).default

    @staticmethod
    def _formula(backward: Callable, backward_op) -> Callable:
        def formula(ctx, *grads):
            return backward(ctx, backward_op, *grads)

        return formula

    def _no_double_backward(self, ctx, *grads):
        raise RuntimeError(
            f"structloss_fast: no second derivative of {self.what} on the fast backends: their gradient "
            f"comes from a fused kernel (structloss_fast::{self.name}_backward) that has no derivative of its "
            "own; use backend='reference' for higher-order gradients")

    def op(self, backend: str):
        """The op that runs a resolved backend: the compiled op for "cpu" / "cuda" (the dispatcher
        picks the kernel by device), the twin for "triton"."""
        return self._ops[backend == "triton"]

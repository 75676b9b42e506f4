"""One helper registers a loss op: its fake kernels, its autograd and its Triton twin.

A loss op `structloss_fast::<name>` comes with a recomputing backward op `<name>_backward`
(both schemas in csrc/ops.cpp, compiled kernels in csrc/cpu and csrc/cuda). `LossOp` registers
for them, in one call:
- the fake kernels (shapes only, for torch.compile and opcheck);
- the autograd formula, given the backward op of the same backend;
- the higher-order gradient policy: when the caller asks for a differentiable gradient
  (create_graph=True), the op's `differentiable_backward` (the gradient written in plain torch
  ops, so its own derivative is exact) when it has one; otherwise the recomputing backward op,
  whose derivative is an error that names the loss (it has no derivative of its own). Never a
  constant gradient that would make a second derivative silently wrong;
- its autocast rule (cpu and cuda): the op runs with autocast off, on inputs cast as the op's
  `autocast` function says (by default as they come: the kernels pick their own accumulation
  dtypes, and the ATen calls inside them must not be autocast);
- optionally the Triton twins `<name>_triton` and `<name>_backward_triton`: the same schemas,
  copied from the compiled ops, with the Python functions of a Triton module as their kernels
  (CPU tensors run them under TRITON_INTERPRET=1), and the same fake kernels, autograd and
  autocast rule.
`op(backend)` is then the op to call for a resolved backend. `loss_dtype` is the dtype a loss
returns (F.cross_entropy's rule, autocast included).
"""
from __future__ import annotations

import contextlib
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


def no_second_derivative(what: str, *grads):
    """The gradients `grads` of a backward that is computed without a graph, made to raise an
    error naming `what` if they are differentiated (torch's once_differentiable, with a message
    that says which loss and what to do). Call it from a backward when create_graph() holds."""
    if not create_graph():
        return grads
    tensors = [g for g in grads if isinstance(g, torch.Tensor)]
    if not tensors:
        return grads
    err = torch._C._functions.DelayedError(
        f"structloss_fast: {what} has no second derivative: its gradient (asked for with create_graph=True) "
        "has no derivative of its own".encode(), len(tensors))
    # The error node needs an input that requires grad to get into the graph.
    out = err(*[g.detach().requires_grad_() for g in tensors])
    wrapped = iter(out if isinstance(out, tuple) else (out,))
    return tuple(next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads)


# ---------------------------------------------------------------- autocast


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def cast_floats(value, dtype: torch.dtype, *, low_only: bool = False):
    """value with its floating tensors (lists too) cast to dtype; float64 is left alone (torch's
    autocast eligibility), and with low_only only float16/bfloat16 are cast."""
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype, low_only=low_only) for v in value)
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and (not low_only or value.dtype in _LOW_PRECISION)):
        return value.to(dtype)
    return value


def to_float32(args, autocast_dtype):
    """Autocast rule of the ops that compute a loss from its inputs: float32, F.cross_entropy's."""
    return cast_floats(args, torch.float32, low_only=True)


def register_autocast(name: str, cast: Optional[Callable] = None) -> None:
    """structloss_fast::<name> under torch.autocast (cpu and cuda): the op runs with autocast off
    (the ATen calls inside the kernels would be autocast otherwise) on `cast(args,
    autocast_dtype)`, or on its inputs as they come."""
    op = getattr(torch.ops.structloss_fast, name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _key=key, _device_type=device_type):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                if cast is not None:
                    args = cast(args, torch.get_autocast_dtype(_device_type))
                return op(*args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(run)  # what torch.compile's tracing dispatches to
        _LIB.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


def autocast_enabled(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def loss_inputs(*tensors):
    """The tensors a loss written in torch ops computes on: as they come, or under autocast
    with float16/bfloat16 cast to float32 (F.cross_entropy's and F.mse_loss's autocast rule).
    Run the loss under autocast_off() then, or its products would be cast back down."""
    if any(t is not None and autocast_enabled(t.device) for t in tensors):
        return tuple(cast_floats(t, torch.float32, low_only=True) for t in tensors)
    return tensors


def autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False) if autocast_enabled(device) else contextlib.nullcontext()


def loss_dtype(*tensors) -> torch.dtype:
    """The dtype a loss of these floating inputs returns, as F.cross_entropy: the promoted
    dtype, or float32 under autocast (float64 is never lowered)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    if dtype != torch.float64 and autocast_enabled(tensors[0].device):
        return torch.float32
    return dtype


class LossOp:
    """Registration and dispatch of one loss op and its twins.

    backward(ctx, backward_op, *grads) is the autograd formula of the forward op; it calls
    `backward_op` (the compiled or the Triton backward, matching the forward) when it recomputes.
    triton: (module, forward function name, backward function name) of the Triton twin.
    what: the public loss in words for the double-backward error, or a function of the backward
        op's inputs that names it (e.g. from the loss id).
    differentiable_backward(ctx, *grads): the gradients in plain torch ops, used instead of
        `backward` when create_graph=True (exact higher-order gradients); None: such gradients
        raise an error naming the loss.
    autocast(args, autocast_dtype) -> args: the inputs the op takes under autocast (see
        register_autocast); None: as they come. The backward ops take theirs as they come.
    """

    def __init__(self, name: str, *, fake: Callable, backward_fake: Callable, setup_context: Callable,
                 backward: Callable, what, triton: Optional[tuple[str, str, str]] = None,
                 differentiable_backward: Optional[Callable] = None, autocast: Optional[Callable] = None):
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
            torch.library.register_autograd(qualname(op_name),
                                            self._formula(backward, differentiable_backward, backward_op),
                                            setup_context=setup_context)
            torch.library.register_autograd(qualname(bwd_name), self._no_double_backward,
                                            setup_context=self._name_the_loss)
            register_autocast(op_name, autocast)
            register_autocast(bwd_name)
            self._ops[is_triton] = getattr(torch.ops.structloss_fast, op_name).default

    @staticmethod
    def _formula(backward: Callable, differentiable_backward: Optional[Callable], backward_op) -> Callable:
        def formula(ctx, *grads):
            if differentiable_backward is not None and create_graph():
                return differentiable_backward(ctx, *grads)
            return backward(ctx, backward_op, *grads)

        return formula

    def _name_the_loss(self, ctx, inputs, output):
        ctx.what = self.what(*inputs) if callable(self.what) else self.what

    def _no_double_backward(self, ctx, *grads):
        raise RuntimeError(
            f"structloss_fast: {ctx.what} has no second derivative on the fast backends (create_graph=True): "
            f"its gradient comes from a fused kernel (structloss_fast::{self.name}_backward) that has no derivative "
            "of its own; use backend='reference' for higher-order gradients")

    def op(self, backend: str):
        """The op that runs a resolved backend: the compiled op for "cpu" / "cuda" (the dispatcher
        picks the kernel by device), the twin for "triton"."""
        return self._ops[backend == "triton"]

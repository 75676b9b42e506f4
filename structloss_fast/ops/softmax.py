"""Op glue of the row-softmax family: fake kernels and autograd for the compiled ops
(structloss_fast::softmax_loss, ::softmax_loss_backward, ::linear_softmax_loss,
::linear_softmax_loss_backward; CPU kernels in csrc/cpu/softmax.cpp) and the Triton ops
(structloss_fast::softmax_loss_triton, ... ; kernels in structloss_fast/triton/softmax.py).

The forward writes the gradient whenever a backward will follow (compute_grad / grad_mask).
softmax_loss: the (N, C) buffer holds each row's own gradient and the backward scales it in
place by the row weights (upstream gradient, / the mean's denominator), so no second N x C
buffer is made; a second backward through the same graph (retain_graph=True) recomputes it
from the saved row statistics with the same products, and a graph traced by torch.compile
scales out of place. linear_softmax_loss: the forward accumulates the gradients of the reduced
loss, (N, H), (C, H) and (C,), which the backward scales out of place.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext
from . import no_double_backward, setup_nothing as _setup_nothing

# Must match SoftmaxTransform / SoftmaxStat / SoftmaxParam in csrc/common/softmax_math.h.
TRANSFORM_IDS = {"identity": 0, "normface": 1, "cosface": 2, "arcface": 3, "circle": 4}
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}
NUM_ROW_STATS = 9
ROW_LOSS = 1
for _op in ("softmax_loss", "linear_softmax_loss"):
    _ext.declare_backends(_op, ("cpu", "triton"))


def make_params(log_end, bonus_weight, label_smoothing, eps, t0=0.0, t1=0.0) -> list[float]:
    return [float(log_end), float(bonus_weight), float(label_smoothing), float(eps), float(t0), float(t1)]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels


def _fake_forward(logits, target, class_weight, ignore_index, transform, params, reduction, compute_grad):
    torch._check(logits.dim() == 2, lambda: "logits must be (N, C)")
    torch._check(target.shape == (logits.shape[0],), lambda: "target must be (N,)")
    N, C = logits.shape
    out = logits.new_empty(()) if reduction != REDUCTION_IDS["none"] else logits.new_empty((N,))
    stats = logits.new_empty((N, NUM_ROW_STATS), dtype=_acc_dtype(logits.dtype))
    grad = logits.new_empty((N if compute_grad else 0, C))
    return out, stats, grad


def _fake_backward(logits, target, class_weight, row_stats, row_weights, ignore_index, transform, params):
    torch._check(row_stats.shape == (logits.shape[0], NUM_ROW_STATS), lambda: "row_stats must be (N, 9)")
    torch._check(row_weights.shape == (logits.shape[0],), lambda: "row_weights must be (N,)")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_linear_forward(input, weight, bias, target, class_weight, ignore_index, transform, params, reduction,
                         grad_mask, row_chunk, class_tile):
    torch._check(input.dim() == 2 and weight.dim() == 2, lambda: "input and weight must be 2-D")
    torch._check(input.shape[1] == weight.shape[1], lambda: "input and weight differ in H")
    N, H = input.shape
    C = weight.shape[0]
    out = input.new_empty(()) if reduction != REDUCTION_IDS["none"] else input.new_empty((N,))
    stats = input.new_empty((N, NUM_ROW_STATS), dtype=_acc_dtype(input.dtype))
    has_bias = bias is not None
    return (out, stats, input.new_empty((N if grad_mask[0] else 0, H)), input.new_empty((C if grad_mask[1] else 0, H)),
            input.new_empty((C if grad_mask[2] and has_bias else 0,)))


def _fake_linear_backward(input, weight, bias, target, class_weight, row_stats, row_weights, ignore_index, transform,
                          params, grad_mask, row_chunk, class_tile):
    N, H = input.shape
    C = weight.shape[0]
    return (input.new_empty((N if grad_mask[0] else 0, H)), input.new_empty((C if grad_mask[1] else 0, H)),
            input.new_empty((C if grad_mask[2] and bias is not None else 0,)))


# ---------------------------------------------------------------- autograd


def mean_denominator(target, class_weight, ignore_index, C, dtype):
    """Sum of the target class weights of the non-ignored rows (1 when that is 0), on device."""
    valid = target != ignore_index
    if class_weight is None:
        denom = valid.sum().to(dtype)
    else:
        safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, max(C - 1, 0))
        denom = (class_weight.to(dtype)[safe] * valid.to(dtype)).sum()
    return torch.where(denom == 0, torch.ones_like(denom), denom)


def row_weights(grad_loss: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                reduction: int, dtype: torch.dtype, num_classes: int) -> Tensor:
    """Upstream gradient of each row loss, given the gradient of the reduced loss."""
    N = target.shape[0]
    if reduction == REDUCTION_IDS["none"]:
        return grad_loss.to(dtype).reshape(N).contiguous()
    w = grad_loss.to(dtype).expand(N)
    if reduction == REDUCTION_IDS["mean"]:
        w = w / mean_denominator(target, class_weight, ignore_index, num_classes, dtype)
    return w.contiguous()


def _tracing(t: Optional[Tensor]) -> bool:
    """True while torch.compile / AOTAutograd traces: buffers are then not consumed in place."""
    if torch.compiler.is_compiling():
        return True
    if t is None:
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch._is_functional_tensor(t) or type(t) is not torch.Tensor


def _consume(ctx, name: str) -> Optional[Tensor]:
    """The gradient buffer written by the forward, handed out once (None afterwards)."""
    buf = getattr(ctx, name, None)
    if buf is not None and not _tracing(buf[0] if isinstance(buf, tuple) else buf):
        setattr(ctx, name, None)
    return buf


def _setup_context(ctx, inputs, output):
    logits, target, class_weight, ignore_index, transform, params, reduction, compute_grad = inputs
    _, row_stats, grad = output
    ctx.save_for_backward(logits, target, class_weight, row_stats)
    # Only the loss is differentiable: without this, autograd would materialize a zero (N, C)
    # gradient for the grad_logits output in every backward.
    ctx.set_materialize_grads(False)
    # Detached: the buffer is an output of this node, and holding it with its grad_fn would make
    # a reference cycle (node -> ctx -> grad -> node).
    ctx.grad_buf = grad.detach() if compute_grad else None
    ctx.spec = (int(ignore_index), int(transform), [float(p) for p in params], int(reduction))


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _g_stats, _g_grad):
        logits, target, class_weight, row_stats = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        ignore_index, transform, params, reduction = ctx.spec
        w = row_weights(grad_loss, target, class_weight, ignore_index, reduction, row_stats.dtype, logits.shape[1])
        buf = _consume(ctx, "grad_buf")
        if buf is not None:
            # buf holds each row's own gradient; the same products as the recomputing kernel.
            g = buf * w.unsqueeze(1) if _tracing(buf) else buf.mul_(w.unsqueeze(1))
        else:
            g = backward_op(logits, target, class_weight, row_stats, w, ignore_index, transform, params)
        return g, None, None, None, None, None, None, None

    return backward


def _setup_linear_context(ctx, inputs, output):
    (input, weight, bias, target, class_weight, ignore_index, transform, params, reduction, grad_mask, row_chunk,
     class_tile) = inputs
    _, row_stats, gx, gw, gb = output
    ctx.save_for_backward(input, weight, bias, target, class_weight, row_stats)
    ctx.set_materialize_grads(False)
    ctx.grads = (gx.detach(), gw.detach(), gb.detach()) if any(grad_mask) else None
    ctx.spec = (int(ignore_index), int(transform), [float(p) for p in params], int(reduction), list(grad_mask),
                int(row_chunk), int(class_tile))


def _make_linear_backward(backward_op):
    def backward(ctx, grad_loss, _g_stats, _g_gx, _g_gw, _g_gb):
        input, weight, bias, target, class_weight, row_stats = ctx.saved_tensors
        ignore_index, transform, params, reduction, grad_mask, row_chunk, class_tile = ctx.spec
        if grad_loss is None:
            return (None,) * 12
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grads = ctx.grads
        out = [None, None, None]
        if grads is not None and all(m or not n for m, n in zip(grad_mask, need)):
            # The forward's gradients of the reduced loss are (N, H) / (C, H) / (C,): scaled out
            # of place, so that retain_graph works and the result is reentrant.
            for k in range(3):
                if need[k]:
                    out[k] = grads[k] * grad_loss.to(grads[k].dtype)
        else:
            w = row_weights(grad_loss, target, class_weight, ignore_index, reduction, row_stats.dtype, weight.shape[0])
            gx, gw, gb = backward_op(input, weight, bias, target, class_weight, row_stats, w, ignore_index, transform,
                                     params, need, row_chunk, class_tile)
            out = [gx if need[0] else None, gw if need[1] else None, gb if need[2] else None]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None, None

    return backward


_no_double_backward = no_double_backward("structloss_fast: the row-softmax losses do not support double backward")


# ---- compiled ops (CPU kernels in csrc/) ----
if _ext.extension_loaded() and _ext.has_kernel("softmax_loss", "CPU"):
    torch.library.register_fake("structloss_fast::softmax_loss")(_fake_forward)
    torch.library.register_fake("structloss_fast::softmax_loss_backward")(_fake_backward)
    torch.library.register_fake("structloss_fast::linear_softmax_loss")(_fake_linear_forward)
    torch.library.register_fake("structloss_fast::linear_softmax_loss_backward")(_fake_linear_backward)
    torch.library.register_autograd(
        "structloss_fast::softmax_loss",
        _make_backward(lambda *a: torch.ops.structloss_fast.softmax_loss_backward(*a)),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        "structloss_fast::linear_softmax_loss",
        _make_linear_backward(lambda *a: torch.ops.structloss_fast.linear_softmax_loss_backward(*a)),
        setup_context=_setup_linear_context,
    )
    for _name in ("softmax_loss_backward", "linear_softmax_loss_backward"):
        torch.library.register_autograd(f"structloss_fast::{_name}", _no_double_backward, setup_context=_setup_nothing)


# ---- Triton ops ----
@torch.library.custom_op("structloss_fast::softmax_loss_triton", mutates_args=())
def softmax_loss_triton(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int, transform: int,
    params: Sequence[float], reduction: int, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward: the same contract as structloss_fast::softmax_loss."""
    from ..triton import softmax as tk

    return tk.softmax_loss(logits, target, class_weight, ignore_index, transform, params, reduction, compute_grad)


softmax_loss_triton.register_fake(_fake_forward)


@torch.library.custom_op("structloss_fast::softmax_loss_backward_triton", mutates_args=())
def softmax_loss_backward_triton(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], row_stats: Tensor, row_weights: Tensor,
    ignore_index: int, transform: int, params: Sequence[float],
) -> Tensor:
    from ..triton import softmax as tk

    return tk.softmax_loss_backward(logits, target, class_weight, row_stats, row_weights, ignore_index, transform,
                                    params)


softmax_loss_backward_triton.register_fake(_fake_backward)
softmax_loss_triton.register_autograd(
    _make_backward(lambda *a: softmax_loss_backward_triton(*a)), setup_context=_setup_context
)
softmax_loss_backward_triton.register_autograd(_no_double_backward, setup_context=_setup_nothing)


@torch.library.custom_op("structloss_fast::linear_softmax_loss_triton", mutates_args=())
def linear_softmax_loss_triton(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    ignore_index: int, transform: int, params: Sequence[float], reduction: int, grad_mask: Sequence[bool],
    row_chunk: int, class_tile: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused linear on the GPU: row chunks of cuBLAS logits, the Triton row kernel writing the
    gradient into the chunk, and cuBLAS products accumulating the gradients in float32."""
    from ..triton import softmax as tk

    return tk.linear_softmax_loss(input, weight, bias, target, class_weight, ignore_index, transform, params,
                                  reduction, list(grad_mask), row_chunk, class_tile)


linear_softmax_loss_triton.register_fake(_fake_linear_forward)


@torch.library.custom_op("structloss_fast::linear_softmax_loss_backward_triton", mutates_args=())
def linear_softmax_loss_backward_triton(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    row_stats: Tensor, row_weights: Tensor, ignore_index: int, transform: int, params: Sequence[float],
    grad_mask: Sequence[bool], row_chunk: int, class_tile: int,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import softmax as tk

    return tk.linear_softmax_loss_backward(input, weight, bias, target, class_weight, row_stats, row_weights,
                                           ignore_index, transform, params, list(grad_mask), row_chunk, class_tile)


linear_softmax_loss_backward_triton.register_fake(_fake_linear_backward)
linear_softmax_loss_triton.register_autograd(
    _make_linear_backward(lambda *a: linear_softmax_loss_backward_triton(*a)), setup_context=_setup_linear_context
)
linear_softmax_loss_backward_triton.register_autograd(_no_double_backward, setup_context=_setup_nothing)


# ---------------------------------------------------------------- dispatch


def softmax_loss(backend: str, logits, target, class_weight, ignore_index, transform, params, reduction, compute_grad):
    """Dispatch to the op of a resolved backend ("cpu" is the compiled op)."""
    params = [float(p) for p in params]
    if backend == "triton":
        return softmax_loss_triton(logits, target, class_weight, ignore_index, transform, params, reduction,
                                   compute_grad)
    return torch.ops.structloss_fast.softmax_loss(logits, target, class_weight, ignore_index, transform, params,
                                                  reduction, compute_grad)


def linear_softmax_loss(backend: str, input, weight, bias, target, class_weight, ignore_index, transform, params,
                        reduction, grad_mask, row_chunk=0, class_tile=0):
    params = [float(p) for p in params]
    grad_mask = [bool(m) for m in grad_mask]
    if backend == "triton":
        return linear_softmax_loss_triton(input, weight, bias, target, class_weight, ignore_index, transform, params,
                                          reduction, grad_mask, row_chunk, class_tile)
    return torch.ops.structloss_fast.linear_softmax_loss(input, weight, bias, target, class_weight, ignore_index,
                                                         transform, params, reduction, grad_mask, row_chunk,
                                                         class_tile)

"""Op glue of the pairwise engine: fake kernels and autograd for the compiled ops
(structloss_fast::pairwise_loss, ::pairwise_loss_backward, CPU and CUDA kernels in csrc/),
and the Triton ops (structloss_fast::pairwise_loss_triton, ::pairwise_loss_backward_triton).

All four take L2-normalized embeddings; the public functions in structloss_fast/pairwise.py
validate input, normalize, and call `pairwise_loss(backend, ...)` below.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _ext

# Must match PairLossKind / ReductionKind / RowStat in csrc/common/pairwise_math.h.
LOSS_IDS = {"circle": 0, "unified": 1}
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}
NUM_ROW_STATS = 3
ROW_LOSS = 2

_OPS = ("pairwise_loss", "pairwise_loss_backward")


def _fake_forward(x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad):
    torch._check(x.dim() == 2 and ref.dim() == 2, lambda: "x and ref must be 2-D")
    torch._check(x.shape[1] == ref.shape[1], lambda: "x and ref differ in embedding size")
    torch._check(labels.shape == (x.shape[0],), lambda: "labels must be (B,)")
    torch._check(ref_labels.shape == (ref.shape[0],), lambda: "ref_labels must be (M,)")
    B, D = x.shape
    M = ref.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.new_empty(()) if reduction != REDUCTION_IDS["none"] else x.new_empty((B,))
    row_stats = x.new_empty((B, NUM_ROW_STATS), dtype=stat_dtype)
    grad_x = x.new_empty((B if compute_grad else 0, D))
    grad_ref = x.new_empty((M if compute_grad and not exclude_self else 0, D))
    return out, row_stats, grad_x, grad_ref


def _fake_backward(x, labels, ref, ref_labels, row_stats, row_weights, exclude_self, loss, params):
    torch._check(row_stats.shape == (x.shape[0], NUM_ROW_STATS), lambda: "row_stats must be (B, 3)")
    torch._check(row_weights.shape == (x.shape[0],), lambda: "row_weights must be (B,)")
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty(x.shape, dtype=acc_dtype),
        x.new_empty((0 if exclude_self else ref.shape[0], x.shape[1]), dtype=acc_dtype),
    )


def row_weights(grad_loss: Tensor, row_stats: Tensor, reduction: int) -> Tensor:
    """Upstream gradient of each row loss, given the gradient of the reduced loss."""
    B = row_stats.shape[0]
    dtype = row_stats.dtype
    if reduction == REDUCTION_IDS["none"]:
        return grad_loss.to(dtype)
    if reduction == REDUCTION_IDS["sum"]:
        return grad_loss.to(dtype).expand(B)
    counts = ~(row_stats[:, ROW_LOSS] <= 0)
    scale = grad_loss.to(dtype) / counts.sum().clamp_min(1).to(dtype)
    return torch.where(counts, scale, torch.zeros((), dtype=dtype, device=row_stats.device))


def reduce_row_losses(row_loss: Tensor, reduction: int) -> Tensor:
    if reduction == REDUCTION_IDS["none"]:
        return row_loss.clone()
    if reduction == REDUCTION_IDS["sum"]:
        return row_loss.sum()
    counts = ~(row_loss <= 0)
    return row_loss.sum() / counts.sum().clamp_min(1).to(row_loss.dtype)


def _setup_context(ctx, inputs, output):
    x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad = inputs
    _, row_stats, grad_x, grad_ref = output
    ctx.save_for_backward(x, labels, ref, ref_labels, row_stats, grad_x, grad_ref)
    ctx.spec = (bool(exclude_self), int(loss), list(params), int(reduction), bool(compute_grad))


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _g_stats, _g_grad_x, _g_grad_ref):
        x, labels, ref, ref_labels, row_stats, grad_x, grad_ref = ctx.saved_tensors
        exclude_self, loss, params, reduction, compute_grad = ctx.spec
        if compute_grad:
            # mean/sum: the forward already formed the gradient of the reduced loss.
            gx = grad_x * grad_loss.to(grad_x.dtype)
            gr = None if exclude_self else grad_ref * grad_loss.to(grad_ref.dtype)
        else:
            weights = row_weights(grad_loss, row_stats, reduction)
            gx, gr = backward_op(x, labels, ref, ref_labels, row_stats, weights, exclude_self, loss, params)
            gx = gx.to(x.dtype)
            gr = None if exclude_self else gr.to(ref.dtype)
        return gx, None, gr, None, None, None, None, None, None

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("structloss_fast: the pairwise losses do not support double backward")


def _setup_nothing(ctx, inputs, output):
    pass


# ---- compiled ops (CPU and CUDA kernels in csrc/) ----
if _ext.extension_loaded():
    torch.library.register_fake("structloss_fast::pairwise_loss")(_fake_forward)
    torch.library.register_fake("structloss_fast::pairwise_loss_backward")(_fake_backward)
    torch.library.register_autograd(
        "structloss_fast::pairwise_loss",
        _make_backward(lambda *a: torch.ops.structloss_fast.pairwise_loss_backward(*a)),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        "structloss_fast::pairwise_loss_backward", _no_double_backward, setup_context=_setup_nothing
    )


# ---- Triton ops ----
@torch.library.custom_op("structloss_fast::pairwise_loss_triton", mutates_args=())
def pairwise_loss_triton(
    x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, exclude_self: bool, loss: int,
    params: Sequence[float], reduction: int, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward. The gradient is always recomputed in backward (compute_grad is ignored:
    the grad outputs are empty), flash-attention style. x may be fp16/bf16 (tensor-core dots);
    the loss and the row statistics are float32 (float64 for float64 x)."""
    from ..triton import pairwise as tk

    ref_in = x if exclude_self else ref
    ref_lab = labels if exclude_self else ref_labels
    stats = tk.forward_row_stats(x, labels, ref_in, ref_lab, exclude_self, loss, params)
    out = reduce_row_losses(stats[:, ROW_LOSS], reduction)
    empty = x.new_empty((0, x.shape[1]))
    return out, stats, empty, empty.clone()


@pairwise_loss_triton.register_fake
def _(x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad):
    out, stats, _, _ = _fake_forward(x, labels, ref, ref_labels, exclude_self, loss, params, reduction, False)
    return out.to(stats.dtype), stats, x.new_empty((0, x.shape[1])), x.new_empty((0, x.shape[1]))


@torch.library.custom_op("structloss_fast::pairwise_loss_backward_triton", mutates_args=())
def pairwise_loss_backward_triton(
    x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, row_stats: Tensor, row_weights: Tensor,
    exclude_self: bool, loss: int, params: Sequence[float],
) -> tuple[Tensor, Tensor]:
    from ..triton import pairwise as tk

    ref_in = x if exclude_self else ref
    ref_lab = labels if exclude_self else ref_labels
    return tk.backward(x, labels, ref_in, ref_lab, row_stats, row_weights, exclude_self, loss, params)


pairwise_loss_backward_triton.register_fake(_fake_backward)


def _setup_context_triton(ctx, inputs, output):
    x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad = inputs
    _setup_context(ctx, (x, labels, ref, ref_labels, exclude_self, loss, params, reduction, False), output)


pairwise_loss_triton.register_autograd(
    _make_backward(lambda *a: pairwise_loss_backward_triton(*a)), setup_context=_setup_context_triton
)
pairwise_loss_backward_triton.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def pairwise_loss(backend: str, x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad):
    """Dispatch to the op of a resolved backend ("cpu"/"cuda" share the compiled op; the
    dispatcher picks the kernel by device)."""
    params = [float(p) for p in params]
    if backend == "triton":
        return pairwise_loss_triton(x, labels, ref, ref_labels, exclude_self, loss, params, reduction, False)
    return torch.ops.structloss_fast.pairwise_loss(
        x, labels, ref, ref_labels, exclude_self, loss, params, reduction, compute_grad
    )

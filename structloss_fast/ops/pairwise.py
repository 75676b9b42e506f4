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
from . import no_double_backward, setup_nothing as _setup_nothing

# Must match PairLossKind / ReductionKind / RowStat in csrc/common/pairwise_math.h.
LOSS_IDS = {
    "circle": 0,
    "unified": 1,
    "multi_similarity": 2,
    "supcon": 3,
    "ntxent": 4,
    "contrastive": 5,
    "triplet_all": 6,
    "triplet_hard": 7,
}
TERMS = {k: (2 if k == LOSS_IDS["contrastive"] else 1) for k in LOSS_IDS.values()}
GATED = {LOSS_IDS["supcon"], LOSS_IDS["ntxent"]}
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}
GRAD_NONE, GRAD_X, GRAD_X_REF = 0, 1, 2
NUM_ROW_STATS = 8
AUX0, AUX1, SUM0, COUNT0, SUM1, COUNT1, NUM_POS, NUM_NEG = range(8)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, grad_mode,
                  epilogue="auto"):
    torch._check(x.dim() == 2 and ref.dim() == 2, lambda: "x and ref must be 2-D")
    torch._check(x.shape[1] == ref.shape[1], lambda: "x and ref differ in embedding size")
    torch._check(labels.shape == (x.shape[0],), lambda: "labels must be (B,)")
    torch._check(ref_labels.shape == (ref.shape[0],), lambda: "ref_labels must be (M,)")
    B, D = x.shape
    M = ref.shape[0]
    out = x.new_empty(()) if reduction != REDUCTION_IDS["none"] else x.new_empty((B, TERMS[loss]))
    row_stats = x.new_empty((B, NUM_ROW_STATS), dtype=_stat_dtype(x))
    grads = grad_mode != GRAD_NONE
    grad_x = x.new_empty((B if grads else 0, D))
    grad_ref = x.new_empty((M if grad_mode == GRAD_X_REF and not ref_is_x else 0, D))
    return out, row_stats, grad_x, grad_ref


def _fake_backward(x, labels, ref, ref_labels, row_stats, row_weights, self_offset, ref_is_x, loss, params, ref_grad,
                   epilogue="auto"):
    torch._check(row_stats.shape == (x.shape[0], NUM_ROW_STATS), lambda: "row_stats must be (B, 8)")
    torch._check(row_weights.shape == (x.shape[0], TERMS[loss]), lambda: "row_weights must be (B, terms)")
    dt = _stat_dtype(x)
    return (
        x.new_empty(x.shape, dtype=dt),
        x.new_empty((ref.shape[0] if ref_grad and not ref_is_x else 0, x.shape[1]), dtype=dt),
    )


def gate(row_stats: Tensor, loss: int) -> Tensor:
    """1 unless PML returns zero for the whole batch (SupCon / NT-Xent without any positive or
    negative pair)."""
    if loss not in GATED:
        return torch.ones((), dtype=row_stats.dtype, device=row_stats.device)
    return ((row_stats[:, NUM_POS].sum() > 0) & (row_stats[:, NUM_NEG].sum() > 0)).to(row_stats.dtype)


def term_sums_counts(row_stats: Tensor, loss: int):
    """Per-term (sum over anchors, reducer count) as two (terms,) tensors."""
    cols_s = [SUM0, SUM1][: TERMS[loss]]
    cols_c = [COUNT0, COUNT1][: TERMS[loss]]
    return row_stats[:, cols_s].sum(0), row_stats[:, cols_c].sum(0)


def reduce_row_stats(row_stats: Tensor, loss: int, reduction: int) -> Tensor:
    g = gate(row_stats, loss)
    if reduction == REDUCTION_IDS["none"]:
        return row_stats[:, [SUM0, SUM1][: TERMS[loss]]] * g
    sums, counts = term_sums_counts(row_stats, loss)
    if reduction == REDUCTION_IDS["mean"]:
        sums = sums / counts.clamp_min(1)
    return sums.sum() * g


def row_weights(grad_loss: Tensor, row_stats: Tensor, loss: int, reduction: int) -> Tensor:
    """Upstream gradient of each anchor's terms (B, terms), given the gradient of the output."""
    B, T = row_stats.shape[0], TERMS[loss]
    dtype = row_stats.dtype
    g = gate(row_stats, loss)
    if reduction == REDUCTION_IDS["none"]:
        return grad_loss.to(dtype) * g
    scale = grad_loss.to(dtype) * g * torch.ones(T, dtype=dtype, device=row_stats.device)
    if reduction == REDUCTION_IDS["mean"]:
        scale = scale / term_sums_counts(row_stats, loss)[1].clamp_min(1)
    return scale.expand(B, T)


def _setup_context(ctx, inputs, output):
    x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, grad_mode = inputs[:10]
    epilogue = inputs[10] if len(inputs) > 10 else "auto"
    _, row_stats, grad_x, grad_ref = output
    ctx.save_for_backward(x, labels, ref, ref_labels, row_stats, grad_x, grad_ref)
    ctx.spec = (int(self_offset), bool(ref_is_x), int(loss), list(params), int(reduction), int(grad_mode), epilogue)
    ctx.n_inputs = len(inputs)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _g_stats, _g_grad_x, _g_grad_ref):
        x, labels, ref, ref_labels, row_stats, grad_x, grad_ref = ctx.saved_tensors
        self_offset, ref_is_x, loss, params, reduction, grad_mode, epilogue = ctx.spec
        want_ref = ctx.needs_input_grad[2] and not ref_is_x
        if grad_mode != GRAD_NONE:
            # mean/sum: the forward already formed the gradient of the reduced loss.
            gx = grad_x * grad_loss.to(grad_x.dtype)
            gr = grad_ref * grad_loss.to(grad_ref.dtype) if (want_ref and grad_mode == GRAD_X_REF) else None
        else:
            weights = row_weights(grad_loss, row_stats, loss, reduction)
            gx, gr = backward_op(x, labels, ref, ref_labels, row_stats, weights, self_offset, ref_is_x, loss, params,
                                 want_ref, epilogue)
            gx = gx.to(x.dtype)
            gr = gr.to(ref.dtype) if want_ref else None
        return (gx, None, gr) + (None,) * (ctx.n_inputs - 3)

    return backward


_no_double_backward = no_double_backward("structloss_fast: the pairwise losses do not support double backward")


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
    x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_offset: int, ref_is_x: bool, loss: int,
    params: Sequence[float], reduction: int, grad_mode: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward. The gradient is always recomputed in backward (grad_mode is ignored:
    the grad outputs are empty), flash-attention style. x may be fp16/bf16 (tensor-core dots);
    the loss and the row statistics are float32 (float64 for float64 x)."""
    from ..triton import pairwise as tk

    ref_in, ref_lab = (x, labels) if ref_is_x else (ref, ref_labels)
    stats = tk.forward_row_stats(x, labels, ref_in, ref_lab, self_offset, loss, params)
    out = reduce_row_stats(stats, loss, reduction)
    empty = x.new_empty((0, x.shape[1]))
    return out, stats, empty, empty.clone()


@pairwise_loss_triton.register_fake
def _(x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, grad_mode):
    out, stats, _, _ = _fake_forward(x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction,
                                     GRAD_NONE)
    return out.to(stats.dtype), stats, x.new_empty((0, x.shape[1])), x.new_empty((0, x.shape[1]))


@torch.library.custom_op("structloss_fast::pairwise_loss_backward_triton", mutates_args=())
def pairwise_loss_backward_triton(
    x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, row_stats: Tensor, row_weights: Tensor,
    self_offset: int, ref_is_x: bool, loss: int, params: Sequence[float], ref_grad: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton import pairwise as tk

    ref_in, ref_lab = (x, labels) if ref_is_x else (ref, ref_labels)
    return tk.backward(x, labels, ref_in, ref_lab, row_stats, row_weights, self_offset, ref_is_x, loss, params,
                       ref_grad)


@pairwise_loss_backward_triton.register_fake
def _(x, labels, ref, ref_labels, row_stats, row_weights, self_offset, ref_is_x, loss, params, ref_grad):
    return _fake_backward(x, labels, ref, ref_labels, row_stats, row_weights, self_offset, ref_is_x, loss, params,
                          ref_grad)


def _setup_context_triton(ctx, inputs, output):
    _setup_context(ctx, tuple(inputs[:9]) + (GRAD_NONE,), output)
    ctx.n_inputs = len(inputs)


pairwise_loss_triton.register_autograd(
    _make_backward(lambda *a: pairwise_loss_backward_triton(*a[:11])), setup_context=_setup_context_triton
)
pairwise_loss_backward_triton.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def pairwise_loss(backend: str, x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, grad_mode,
                  epilogue="auto"):
    """Dispatch to the op of a resolved backend ("cpu"/"cuda" share the compiled op; the
    dispatcher picks the kernel by device). Returns (loss, row_stats)."""
    params = [float(p) for p in params]
    if backend == "triton":
        out = pairwise_loss_triton(x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, GRAD_NONE)
    else:
        out = torch.ops.structloss_fast.pairwise_loss(
            x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, reduction, grad_mode, epilogue
        )
    return out[0], out[1]

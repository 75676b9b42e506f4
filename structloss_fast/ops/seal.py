"""Op glue of the SEAL family: fake kernels and autograd of the compiled ops
(structloss_fast::seal_nce_loss, ::seal_nce_loss_backward, ::seal_bernoulli; CPU kernels in
csrc/cpu/seal.cpp) and the Triton ops (structloss_fast::seal_nce_loss_triton,
::seal_nce_loss_backward_triton).

The public functions in structloss_fast/seal.py validate input, draw the seed from torch's
generator, and call `nce_loss(backend, ...)` below. Gradients flow into unary, global_weight,
global_bias and global_out; probs, labels, seed and samples are constants.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import no_double_backward, setup_nothing as _setup_nothing

REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}
_ext.declare_backends("seal_nce_loss", ("cpu", "triton"))


def _fake_forward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction,
                  compute_grad):
    torch._check(unary.dim() == 2, lambda: "unary must be (B, L)")
    torch._check(probs.shape == unary.shape and labels.shape == unary.shape,
                 lambda: "probs and labels must have unary's shape")
    torch._check(weight.dim() == 2 and weight.shape[1] == unary.shape[1], lambda: "global_weight must be (H, L)")
    torch._check(num_samples >= 1, lambda: "num_samples must be >= 1")
    B, L = unary.shape
    H = weight.shape[0]
    loss = unary.new_empty((B,)) if reduction == REDUCTION_IDS["none"] else unary.new_empty(())
    stats = unary.new_empty((B, num_samples + 2))
    if compute_grad:
        grads = (unary.new_empty((B, L)), unary.new_empty((H, L)), unary.new_empty((H,)), unary.new_empty((H,)))
    else:
        grads = (unary.new_empty((0, L)), unary.new_empty((0, L)), unary.new_empty((0,)), unary.new_empty((0,)))
    return (loss, stats) + grads


def _fake_backward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, stats, row_weights):
    torch._check(stats.shape == (unary.shape[0], num_samples + 2), lambda: "stats must be (B, K + 2)")
    torch._check(row_weights.shape == (unary.shape[0],), lambda: "row_weights must be (B,)")
    B, L = unary.shape
    H = weight.shape[0]
    return unary.new_empty((B, L)), unary.new_empty((H, L)), unary.new_empty((H,)), unary.new_empty((H,))


def row_weights(grad_loss: Tensor, batch: int, reduction: int, dtype) -> Tensor:
    """Upstream gradient of each example's loss, given the gradient of the reduced loss."""
    g = grad_loss.to(dtype)
    if reduction == REDUCTION_IDS["none"]:
        return g
    if reduction == REDUCTION_IDS["sum"]:
        return g.expand(batch)
    return (g / max(batch, 1)).expand(batch)


def _setup_context(ctx, inputs, output):
    unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction, compute_grad = inputs
    _, stats, gu, gw, gb, gc = output
    ctx.save_for_backward(unary, probs, labels, weight, bias, out, seed, samples, stats, gu, gw, gb, gc)
    ctx.spec = (int(num_samples), bool(use_logq), int(reduction), bool(compute_grad))


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _g_stats, _g_gu, _g_gw, _g_gb, _g_gc):
        unary, probs, labels, weight, bias, out, seed, samples, stats, gu, gw, gb, gc = ctx.saved_tensors
        num_samples, use_logq, reduction, compute_grad = ctx.spec
        if compute_grad:
            # mean/sum: the forward already formed the gradient of the reduced loss.
            s = grad_loss.to(gu.dtype)
            grads = (gu * s, gw * s, gb * s, gc * s)
        else:
            weights = row_weights(grad_loss, unary.shape[0], reduction, stats.dtype)
            grads = backward_op(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq,
                                stats, weights)
        gu_, gw_, gb_, gc_ = grads
        return (gu_.to(unary.dtype), None, None, gw_.to(weight.dtype), gb_.to(bias.dtype), gc_.to(out.dtype),
                None, None, None, None, None, None)

    return backward


_no_double_backward = no_double_backward(
    "structloss_fast: the SEAL noise-contrastive loss does not support double backward")


# ---- compiled ops (CPU kernels in csrc/cpu/seal.cpp) ----
if _ext.extension_loaded() and _ext.has_kernel("seal_nce_loss", "CPU"):
    torch.library.register_fake("structloss_fast::seal_nce_loss")(_fake_forward)
    torch.library.register_fake("structloss_fast::seal_nce_loss_backward")(_fake_backward)

    @torch.library.register_fake("structloss_fast::seal_bernoulli")
    def _(probs, seed, num_samples):
        torch._check(probs.dim() == 2, lambda: "probs must be (B, L)")
        return probs.new_empty((probs.shape[0], num_samples, probs.shape[1]))

    torch.library.register_autograd(
        "structloss_fast::seal_nce_loss",
        _make_backward(lambda *a: torch.ops.structloss_fast.seal_nce_loss_backward(*a)),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        "structloss_fast::seal_nce_loss_backward", _no_double_backward, setup_context=_setup_nothing
    )


# ---- Triton ops ----
@torch.library.custom_op("structloss_fast::seal_nce_loss_triton", mutates_args=())
def seal_nce_loss_triton(
    unary: Tensor, probs: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, out: Tensor, seed: Tensor,
    samples: Optional[Tensor], num_samples: int, use_logq: bool, reduction: int, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton forward. The gradient is always recomputed in backward (compute_grad is ignored:
    the grad outputs are empty)."""
    from ..triton import seal as tk

    stats = tk.forward_stats(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq)
    rows = stats[:, num_samples + 1] - stats[:, 0]
    if reduction == REDUCTION_IDS["none"]:
        loss = rows.clone()
    elif reduction == REDUCTION_IDS["sum"]:
        loss = rows.sum()
    else:
        loss = rows.mean()
    B, L = unary.shape
    return (loss, stats, unary.new_empty((0, L)), unary.new_empty((0, L)), unary.new_empty((0,)),
            unary.new_empty((0,)))


@seal_nce_loss_triton.register_fake
def _(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction, compute_grad):
    return _fake_forward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction,
                         False)


@torch.library.custom_op("structloss_fast::seal_nce_loss_backward_triton", mutates_args=())
def seal_nce_loss_backward_triton(
    unary: Tensor, probs: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, out: Tensor, seed: Tensor,
    samples: Optional[Tensor], num_samples: int, use_logq: bool, stats: Tensor, row_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton import seal as tk

    return tk.backward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, stats, row_weights)


seal_nce_loss_backward_triton.register_fake(_fake_backward)


def _setup_context_triton(ctx, inputs, output):
    unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction, compute_grad = inputs
    _setup_context(ctx, (unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction,
                         False), output)


seal_nce_loss_triton.register_autograd(
    _make_backward(lambda *a: seal_nce_loss_backward_triton(*a)), setup_context=_setup_context_triton
)
seal_nce_loss_backward_triton.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def nce_loss(backend: str, unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, reduction,
             compute_grad):
    """Dispatch to the op of a resolved backend ("cpu"/"cuda" share the compiled op)."""
    if backend == "triton":
        return seal_nce_loss_triton(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq,
                                    reduction, False)
    return torch.ops.structloss_fast.seal_nce_loss(unary, probs, labels, weight, bias, out, seed, samples,
                                                   num_samples, use_logq, reduction, compute_grad)

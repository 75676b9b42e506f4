"""Op glue of the SEAL family: the registration of structloss_fast::seal_nce_loss (fake
kernels, autograd, Triton twin; CPU kernels in csrc/cpu/seal.cpp) and of ::seal_bernoulli,
their backends, and the one reduction of the per-example statistics.

The op returns stats (B, K + 2) = (z_0 .. z_K, LSE); example b's loss is LSE_b - z_0,b, and
`reduce` below sums or averages those for every backend alike. Gradients flow into unary,
global_weight, global_bias and global_out; probs, labels, seed and samples are constants.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext, _oplib, _registry
from .reference import reduce as reduce_rows

OP = "seal_nce_loss"


def _fake_forward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, compute_grad):
    torch._check(unary.dim() == 2, lambda: "unary must be (B, L)")
    torch._check(probs.shape == unary.shape and labels.shape == unary.shape,
                 lambda: "probs and labels must have unary's shape")
    torch._check(weight.dim() == 2 and weight.shape[1] == unary.shape[1], lambda: "global_weight must be (H, L)")
    torch._check(num_samples >= 1, lambda: "num_samples must be >= 1")
    B, L = unary.shape
    H = weight.shape[0]
    stats = unary.new_empty((B, num_samples + 2))
    if compute_grad:
        grads = (unary.new_empty((B, L)), unary.new_empty((H, L)), unary.new_empty((H,)), unary.new_empty((H,)))
    else:
        grads = (unary.new_empty((0, L)), unary.new_empty((0, L)), unary.new_empty((0,)), unary.new_empty((0,)))
    return (stats,) + grads


def _fake_backward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, stats, row_weights):
    torch._check(stats.shape == (unary.shape[0], num_samples + 2), lambda: "stats must be (B, K + 2)")
    torch._check(row_weights.shape == (unary.shape[0],), lambda: "row_weights must be (B,)")
    B, L = unary.shape
    H = weight.shape[0]
    return unary.new_empty((B, L)), unary.new_empty((H, L)), unary.new_empty((H,)), unary.new_empty((H,))


def _setup_context(ctx, inputs, output):
    unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, compute_grad = inputs
    stats, gu, gw, gb, gc = output
    ctx.save_for_backward(unary, probs, labels, weight, bias, out, seed, samples, stats, gu, gw, gb, gc)
    ctx.spec = (int(num_samples), bool(use_logq))
    ctx.mark_non_differentiable(gu, gw, gb, gc)
    ctx.set_materialize_grads(False)


def _backward(ctx, backward_op, grad_stats, *_grad_grads):
    unary, probs, labels, weight, bias, out, seed, samples, stats, gu, gw, gb, gc = ctx.saved_tensors
    num_samples, use_logq = ctx.spec
    if grad_stats is None:
        return (None,) * 11
    # loss_b = LSE_b - z_0,b: the gradient of the LSE column is each example's weight.
    w = grad_stats[:, num_samples + 1].to(stats.dtype)
    if gu.shape[0] == unary.shape[0] and gw.shape[0] == weight.shape[0] and not _oplib.create_graph():
        # The forward wrote the gradients of the unit-weight sum; it is asked for only by
        # reductions that weight every example alike (mean, sum): example 0's weight is theirs.
        w0 = w[:1].sum()
        grads = (gu * w.unsqueeze(1), gw * w0, gb * w0, gc * w0)
    else:
        grads = backward_op(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq, stats,
                            w.contiguous())
    need = ctx.needs_input_grad
    gu_, gw_, gb_, gc_ = (g.to(t.dtype) if n else None
                          for g, t, n in zip(grads, (unary, weight, bias, out), (need[0], need[3], need[4], need[5])))
    return gu_, None, None, gw_, gb_, gc_, None, None, None, None, None


LOSS_OP = _oplib.LossOp(
    OP, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context, backward=_backward,
    what="sampled_nce_loss (and nce_ranking_loss)", triton=("structloss_fast.seal._triton", "forward", "backward"),
)

if _ext.extension_loaded():
    @torch.library.register_fake(_oplib.qualname("seal_bernoulli"))
    def _(probs, seed, num_samples):
        torch._check(probs.dim() == 2, lambda: "probs must be (B, L)")
        return probs.new_empty((probs.shape[0], num_samples, probs.shape[1]))

    _oplib.register_autocast("seal_bernoulli")


def _check_supported(backend: str, *, unary: Tensor, num_samples: int):
    if backend == "triton":
        from . import _triton

        return _triton.check_supported(unary, num_samples)
    return None


_registry.declare(_registry.OpSpec(
    OP, family="seal", kernels=("cpu", "triton"), check_supported=_check_supported,
    limits={"triton": "its configuration table has no entry for the dtype (it has one for every L, K and B)"},
))
# seal_bernoulli's Triton kernel is a plain function (the samples carry no gradient): no twin op.
_registry.declare(_registry.OpSpec("seal_bernoulli", family="seal", kernels=("cpu", "triton")))


def resolve(backend: str, unary: Tensor, num_samples: int) -> str:
    return _registry.resolve(OP, backend, unary.device, unary=unary, num_samples=num_samples)


def example_losses(stats: Tensor, num_samples: int) -> Tensor:
    """Each example's loss LSE_k z_k - z_0 (B,), differentiable."""
    return stats[:, num_samples + 1] - stats[:, 0]


def reduce(stats: Tensor, num_samples: int, reduction: str) -> Tensor:
    """The loss from the statistics, for every backend: the examples' losses reduced as the
    reference reduces them (reference.reduce)."""
    return reduce_rows(example_losses(stats, num_samples), reduction)


def run(backend: str, unary, probs, labels, weight, bias, out, seed, samples, num_samples: int, use_logq: bool,
        compute_grad: bool) -> Tensor:
    """The statistics (B, K + 2) of a resolved backend. compute_grad only for reductions that
    weight every example alike (see _backward)."""
    return LOSS_OP.op(backend)(unary, probs, labels, weight, bias, out, seed, samples, int(num_samples),
                               bool(use_logq), bool(compute_grad))[0]

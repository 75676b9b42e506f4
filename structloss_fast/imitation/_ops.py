"""Op glue of the imitation family: the registration of structloss_fast::layer_imitation_loss
(fake kernels, autograd; CPU kernels in csrc/cpu/imitation.cpp), its backends, and the one
reduction of its per-layer statistics.

The op returns each layer's sum of squared differences in float64; `reduce` weights them (the
weight and the layer's reduction in one scale per layer) and adds them, so autograd hands the
backward the gradient of each layer's sum. The forward keeps nothing but the inputs (which
autograd holds anyway): the gradients coef_i * (s_i - t_i) are recomputed by the backward kernel
in one pass over all layers. When the backward itself is differentiated (create_graph=True), it
is written with plain PyTorch ops instead, so double backward is exact (the loss is quadratic).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _oplib, _registry

OP = "layer_imitation_loss"


# ---------------------------------------------------------------- fake kernels


def _fake_forward(student, teacher):
    torch._check(len(student) >= 1, lambda: "layer_imitation_loss needs at least one layer")
    torch._check(len(student) == len(teacher), lambda: "student and teacher differ in the number of layers")
    for s, t in zip(student, teacher):
        torch._check(s.shape == t.shape, lambda: "student and teacher layers differ in shape")
    return student[0].new_empty((len(student),), dtype=torch.float64)


def _fake_backward(student, teacher, coef, grad_mask):
    torch._check(coef.shape == (len(student),), lambda: "coef must be (L,)")
    grad_s = [s.new_empty(s.shape) if grad_mask[0] else s.new_empty((0,)) for s in student]
    grad_t = [s.new_empty(s.shape) if grad_mask[1] else s.new_empty((0,)) for s in student]
    return grad_s, grad_t


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    student, teacher = inputs
    ctx.n_layers = len(student)
    ctx.grad_mask = [any(s.requires_grad for s in student), any(t.requires_grad for t in teacher)]
    ctx.save_for_backward(*student, *teacher)
    ctx.set_materialize_grads(False)


def _saved(ctx):
    saved = ctx.saved_tensors
    L = ctx.n_layers
    return list(saved[:L]), list(saved[L:]), list(ctx.grad_mask), [None] * L


def _differentiable_backward(ctx, grad_sums):
    """The same formula in differentiable PyTorch ops (exact double backward)."""
    student, teacher, mask, nothing = _saved(ctx)
    if grad_sums is None or not any(mask):
        return nothing, nothing
    coef = 2.0 * grad_sums.to(student[0].dtype)
    grads = [coef[i] * (s - t) for i, (s, t) in enumerate(zip(student, teacher))]
    return (grads if mask[0] else nothing), ([-g for g in grads] if mask[1] else nothing)


def _backward(ctx, backward_op, grad_sums):
    # A Tensor[] input takes a list of gradients, None for each when there are none.
    student, teacher, mask, nothing = _saved(ctx)
    if grad_sums is None or not any(mask):
        return nothing, nothing
    acc = torch.float64 if student[0].dtype == torch.float64 else torch.float32
    grad_s, grad_t = backward_op(student, teacher, (2.0 * grad_sums).to(acc), mask)
    return (list(grad_s) if mask[0] else nothing), (list(grad_t) if mask[1] else nothing)


LOSS_OP = _oplib.LossOp(OP, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context,
                        backward=_backward, differentiable_backward=_differentiable_backward,
                        what="layer_imitation_loss")

_registry.declare(_registry.OpSpec(OP, family="imitation", kernels=("cpu",)))


# ---------------------------------------------------------------- the one reduction


def reduce(layer_sq_sums: Tensor, scales: Sequence[float], dtype: torch.dtype, per_layer: bool) -> Tensor:
    """sum_i scale_i * layer_sq_sums_i, the terms and their sum taken in float64 and rounded once
    to `dtype`; per_layer: the (L,) weighted terms."""
    terms = layer_sq_sums * torch.tensor(scales, dtype=torch.float64, device=layer_sq_sums.device)
    return terms.to(dtype) if per_layer else terms.sum().to(dtype)


def run(backend: str, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """The per-layer sums of squared differences (L,) float64 of a resolved backend."""
    return LOSS_OP.op(backend)(list(student), list(teacher))

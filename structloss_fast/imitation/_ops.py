"""Op glue of the imitation family: fake kernels and autograd of structloss_fast::layer_imitation_loss
and ::layer_imitation_loss_backward (CPU kernels in csrc/cpu/imitation.cpp).

The forward keeps nothing but the inputs (which autograd holds anyway): the gradients
coef_i * (s_i - t_i) are recomputed by the backward kernel in one pass over all layers. When the
backward itself is differentiated (create_graph=True), it is written with plain PyTorch ops
instead, so double backward is exact (the loss is quadratic: its second derivative is the
constant 2 w_i / D_i).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext
from ..ops import no_double_backward, setup_nothing

OP = "layer_imitation_loss"
_ext.declare_backends(OP, ("cpu",))


# ---------------------------------------------------------------- fake kernels


def _fake_forward(student, teacher, scales):
    torch._check(len(student) >= 1, lambda: "layer_imitation_loss needs at least one layer")
    torch._check(len(student) == len(teacher), lambda: "student and teacher differ in the number of layers")
    torch._check(len(scales) == len(student), lambda: "one scale per layer expected")
    for s, t in zip(student, teacher):
        torch._check(s.shape == t.shape, lambda: "student and teacher layers differ in shape")
    s0 = student[0]
    return s0.new_empty(()), s0.new_empty((len(student),))


def _fake_backward(student, teacher, coef, grad_mask):
    torch._check(coef.shape == (len(student),), lambda: "coef must be (L,)")
    grad_s = [s.new_empty(s.shape) if grad_mask[0] else s.new_empty((0,)) for s in student]
    grad_t = [s.new_empty(s.shape) if grad_mask[1] else s.new_empty((0,)) for s in student]
    return grad_s, grad_t


# ---------------------------------------------------------------- autograd


def layer_coefficients(scales: Sequence[float], grad_loss: Optional[Tensor], grad_layers: Optional[Tensor],
                       dtype: torch.dtype, device) -> Tensor:
    """coef_i = 2 * scale_i * (upstream gradient of the total + that of layer i's term), (L,)."""
    coef = torch.tensor([2.0 * s for s in scales], dtype=dtype, device=device)
    upstream = None
    if grad_loss is not None:
        upstream = grad_loss.to(dtype)
    if grad_layers is not None:
        upstream = grad_layers.to(dtype) if upstream is None else upstream + grad_layers.to(dtype)
    return coef * upstream


def _setup_context(ctx, inputs, output):
    student, teacher, scales = inputs
    ctx.n_layers = len(student)
    ctx.scales = [float(s) for s in scales]
    ctx.grad_mask = [any(s.requires_grad for s in student), any(t.requires_grad for t in teacher)]
    ctx.save_for_backward(*student, *teacher)
    # Each of the two outputs may be unused: no zero tensors for them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_layers):
    saved = ctx.saved_tensors
    L = ctx.n_layers
    student, teacher = list(saved[:L]), list(saved[L:])
    mask = list(ctx.grad_mask)
    nothing = [None] * L  # a Tensor[] input takes a list of gradients, None for each when there are none
    if (grad_loss is None and grad_layers is None) or not any(mask):
        return nothing, nothing, None
    if torch.is_grad_enabled():
        # create_graph=True: the same formula in differentiable PyTorch ops (exact double backward).
        coef = layer_coefficients(ctx.scales, grad_loss, grad_layers, student[0].dtype, student[0].device)
        grads = [coef[i] * (s - t) for i, (s, t) in enumerate(zip(student, teacher))]
        return (grads if mask[0] else nothing), ([-g for g in grads] if mask[1] else nothing), None
    acc = torch.float64 if student[0].dtype == torch.float64 else torch.float32
    coef = layer_coefficients(ctx.scales, grad_loss, grad_layers, acc, student[0].device)
    grad_s, grad_t = torch.ops.structloss_fast.layer_imitation_loss_backward(student, teacher, coef, mask)
    return (list(grad_s) if mask[0] else nothing), (list(grad_t) if mask[1] else nothing), None


if _ext.extension_loaded() and _ext.has_kernel(OP, "CPU"):
    torch.library.register_fake(f"structloss_fast::{OP}")(_fake_forward)
    torch.library.register_fake(f"structloss_fast::{OP}_backward")(_fake_backward)
    torch.library.register_autograd(f"structloss_fast::{OP}", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        f"structloss_fast::{OP}_backward",
        no_double_backward("structloss_fast: layer_imitation_loss's backward kernel has no derivative; "
                           "double backward (create_graph=True) uses the differentiable formula instead"),
        setup_context=setup_nothing,
    )


def layer_imitation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], scales: Sequence[float]):
    """The compiled op: (loss, layer_losses)."""
    return torch.ops.structloss_fast.layer_imitation_loss(list(student), list(teacher), [float(s) for s in scales])

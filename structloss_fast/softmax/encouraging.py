"""Row-softmax losses (docs/spec/softmax.md): the Encouraging Loss with F.cross_entropy's
interface (class indices or class probabilities), and its fused-linear form that never
materializes the (N, C) logits.

Encouraging Loss (Zhao et al., "Well-classified examples are underestimated in classification
with deep neural networks", AAAI 2022) adds to cross-entropy a bonus rho * log(1 - p) for the
target probability p (clamped at eps, and replaced above p = log_end by its tangent: the
conservative bonus), so that well-classified examples keep a gradient. bonus_weight=0 is
exactly F.cross_entropy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _registry, _validate
from .._module import LossModule
from . import _ops
from . import reference as _ref

__all__ = ["encouraging_loss", "EncouragingLoss", "linear_encouraging_loss", "LinearEncouragingLoss"]


# ---------------------------------------------------------------- validation


def check_el_options(log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction):
    log_end = _validate.number("log_end", log_end, lo=0.0, hi=1.0, lo_open=True)
    bonus_weight = _validate.number("bonus_weight", bonus_weight, lo=0.0)
    label_smoothing = _validate.number("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    eps = _validate.number("eps", eps, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    ignore_index = _validate.integer("ignore_index", ignore_index)
    _validate.reduction(reduction)
    return log_end, bonus_weight, label_smoothing, eps, ignore_index


def check_class_weight(name: str, weight, C: int):
    if weight is None:
        return None
    _validate.tensor(name, weight, ndim=1, floating=True)
    if weight.shape[0] != C:
        raise ValueError(f"{name} must have one entry per class ({C}), got shape {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        # The kernels take the class weights as constants (as F.cross_entropy does).
        raise ValueError(f"{name} (the class weights) gets no gradient; pass {name}.detach()")
    return weight


def check_target_range(target: Tensor, C: int, ignore_index: int, name: str = "target") -> None:
    """Class indices in [0, C) or ignore_index. Checked on CPU tensors only (reading a CUDA
    tensor would synchronize; the GPU kernels turn an out-of-range target into a NaN loss)."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bad.any():
        pos = int(bad.nonzero()[0, 0]) if bad.dim() <= 1 else tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must hold class indices in [0, {C}) or ignore_index={ignore_index}, "
            f"got {int(target[pos] if bad.dim() <= 1 else target[pos])} at position {pos}"
        )


def _rows(input: Tensor, target: Tensor):
    """Validated (rows (M, C), targets (M,) or (M, C), shape of a 'none' output)."""
    _validate.tensor("input", input, floating=True)
    _validate.tensor("target", target)
    if input.dim() == 0:
        raise ValueError(f"input must have a class dimension, got shape {tuple(input.shape)}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"class-probability targets (a floating target) must have input's shape "
                             f"{tuple(input.shape)}, got shape {tuple(target.shape)}")
        return _ref.flatten_rows(input, target)
    _validate.tensor("target", target, integer=True)
    if input.dim() == 1:
        expected = ()
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for input of shape {tuple(input.shape)} "
            f"(class indices; the class dimension is dim 1), got shape {tuple(target.shape)}"
        )
    return _ref.flatten_rows(input, target)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- encouraging_loss


def encouraging_loss(
    input: Tensor,
    target: Tensor,
    *,
    log_end: float = 0.75,
    bonus_weight: float = 1.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Encouraging Loss of logits `input` for class-index `target`, with F.cross_entropy's
    interface and semantics.

    Args:
        input: (N, C), (C,) or (N, C, d1, ...) logits, float16/bfloat16/float32/float64.
        target: (N,), () or (N, d1, ...) integer class indices in [0, C) or ignore_index (any
            integer dtype); or class probabilities of input's shape (a floating tensor, as
            F.cross_entropy takes them: mixup, distillation), whose row loss is
            sum_j w_j ((1 - ls) t_j + ls / C) f_j, "mean" then dividing by the number of rows;
            their gradient is returned when they require it.
        log_end: LE in (0, 1]: above p = LE the bonus is its tangent (the conservative bonus);
            1.0 is the plain bonus. The authors' default is 0.75.
        bonus_weight: rho >= 0, the weight of the bonus; 0 gives F.cross_entropy.
        weight: optional (C,) class weights, as F.cross_entropy's.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: "mean" (sum over rows / sum of the target class weights of the non-ignored
            rows; 0 when there are none), "sum" or "none".
        label_smoothing: ls in [0, 1]: (1 - ls) * EL(target) + ls * mean over classes of EL.
        eps: the clamp of 1 - p inside the bonus log (the authors' 1e-5).
        backend: "auto" | "reference" | "cpu" | "triton".

    Returns the loss in input's dtype (shape of target for "none"), or in float32 under
    autocast, as F.cross_entropy; under autocast it is computed in float32.
    """
    log_end, bonus_weight, label_smoothing, eps, ignore_index = check_el_options(
        log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
    rows, tgt, out_shape = _rows(input, target)
    C = rows.shape[1]
    weight = check_class_weight("weight", weight, C)
    _validate.same_device(input=input, target=target, weight=weight)
    probs = tgt.is_floating_point()
    if not probs:
        check_target_range(tgt, C, ignore_index)
    chosen = _registry.resolve(_ops.OP, backend, input.device)
    kwargs = dict(log_end=log_end, bonus_weight=bonus_weight, weight=weight, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing, eps=eps)
    dtype = _oplib.loss_dtype(input)
    if chosen == "reference":
        input, target, kwargs["weight"] = _oplib.loss_inputs(input, target, weight)  # (float32 under autocast)
        with _oplib.autocast_off(input.device):
            return _ref.encouraging_loss(input, target, **kwargs).to(dtype)
    if C == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    params = _ops.make_params(log_end, bonus_weight, label_smoothing, eps)
    tgt = tgt.to(rows.dtype) if probs else tgt.to(torch.int64)
    stats = _ops.run(chosen, rows, tgt, weight, ignore_index, _ops.TRANSFORMS["identity"], params,
                     _needs_grad(input))
    out = _ops.reduce(stats, tgt, weight, ignore_index, C, reduction).to(dtype)
    if reduction == "none":
        out = out.reshape(out_shape)
    return out


_EL_OPTIONS = ("log_end", "bonus_weight", "ignore_index", "reduction", "label_smoothing", "eps", "backend")


class EncouragingLoss(LossModule):
    """nn.CrossEntropyLoss-style module of encouraging_loss (class indices or class
    probabilities as targets); `weight` (class weights) is kept as a buffer."""

    _function = encouraging_loss
    _options = _EL_OPTIONS + ("weight",)

    def __init__(self, weight: Optional[Tensor] = None, *, log_end: float = 0.75, bonus_weight: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-5,
                 backend: str = "auto"):
        check_el_options(log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
        super().__init__(log_end=log_end, bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, eps=eps, backend=backend)
        self.register_buffer("weight", weight)


# ---------------------------------------------------------------- fused linear


def run_linear(chosen, x, W, b, target, class_weight, ignore_index, transform, params, reduction, row_chunk=0,
               class_tile=0):
    """The fused op on validated 2-D input (x, W and b may differ in dtype: they are computed in
    the promoted one); returns the loss in that dtype (float32 under autocast)."""
    dtype = _oplib.loss_dtype(x, W, b)
    x, W = x.to(dtype), W.to(dtype)
    b = None if b is None else b.to(dtype)
    mask = [False, False, False]
    if reduction != "none" and torch.is_grad_enabled():
        mask = [x.requires_grad, W.requires_grad, b is not None and b.requires_grad]
    target = target.to(torch.int64)
    stats = _ops.run_linear(chosen, x, W, b, target, class_weight, ignore_index, transform, params, mask, row_chunk,
                            class_tile)
    return _ops.reduce(stats, target, class_weight, ignore_index, W.shape[0], reduction).to(dtype)


def linear_encouraging_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor] = None,
    *,
    log_end: float = 0.75,
    bonus_weight: float = 1.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    eps: float = 1e-5,
    backend: str = "auto",
    chunk_rows: int = 0,
    class_tile: int = 0,
) -> Tensor:
    """encouraging_loss(input @ linear_weight.T + linear_bias, target, ...) without the (N, C)
    logits: rows are processed in chunks (and classes in tiles with an online log-sum-exp when C
    is very large), the logit gradient is written into the chunk's buffer and the gradients of
    input, linear_weight and linear_bias are accumulated in float32 (float64 for float64).
    Argument names follow torch.nn.functional.linear_cross_entropy: `weight` is the per-class
    loss weight, `linear_weight` (C, H) and `linear_bias` (C,) the projection.

    Args:
        input: (..., H) hidden states, e.g. (N, H), (H,) or (B, T, H); target: (...) class
            indices, e.g. (N,), () or (B, T). input, linear_weight and linear_bias may differ in
            dtype (bfloat16 activations with float32 master weights): they are computed in the
            promoted dtype, or under autocast the products in the autocast dtype and the loss in
            float32 (F.linear then F.cross_entropy's rules), which is the dtype returned.
        chunk_rows, class_tile: 0 picks them (about 32 MiB of float32 logits per chunk).
        Other arguments as encouraging_loss ("none" returns target's shape).
    """
    log_end, bonus_weight, label_smoothing, eps, ignore_index = check_el_options(
        log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
    _validate.tensor("input", input, floating=True)
    _validate.tensor("linear_weight", linear_weight, ndim=2, floating=True)
    _validate.tensor("target", target, integer=True)
    if input.dim() == 0:
        raise ValueError(f"input must be (..., H), got shape {tuple(input.shape)}")
    H = input.shape[-1]
    C = linear_weight.shape[0]
    if linear_weight.shape[1] != H:
        raise ValueError(f"linear_weight must be (C, H) with H={H} (input's last dimension), "
                         f"got shape {tuple(linear_weight.shape)}")
    if linear_bias is not None:
        _validate.tensor("linear_bias", linear_bias, ndim=1, floating=True)
        if linear_bias.shape[0] != C:
            raise ValueError(f"linear_bias must be ({C},), got shape {tuple(linear_bias.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)} (one class index per row of H), got shape {tuple(target.shape)}")
    weight = check_class_weight("weight", weight, C)
    _validate.same_device(input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                          weight=weight)
    check_target_range(target.reshape(-1), C, ignore_index)
    chunk_rows = _validate.integer("chunk_rows", chunk_rows, lo=0)
    class_tile = _validate.integer("class_tile", class_tile, lo=0)
    chosen = _registry.resolve(_ops.LINEAR_OP, backend, input.device)
    kwargs = dict(log_end=log_end, bonus_weight=bonus_weight, weight=weight, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing, eps=eps)
    x = input.reshape(-1, H)
    tgt = target.reshape(-1)
    if chosen == "reference":
        # The op's rules: the promoted dtype, or under autocast the operands in the autocast
        # dtype and the products and loss in float32.
        dtype = _oplib.loss_dtype(input, linear_weight, linear_bias)
        operands = (x, linear_weight, linear_bias)
        if _oplib.autocast_enabled(x.device):
            operands = _oplib.cast_floats(operands, torch.get_autocast_dtype(x.device.type))
        x_, w_, b_ = _oplib.cast_floats(operands, dtype)
        kwargs["weight"], = _oplib.loss_inputs(weight)
        with _oplib.autocast_off(x.device):
            out = _ref.linear_encouraging_loss(x_, w_, tgt, b_, **kwargs)
    else:
        if C == 0:
            raise ValueError("linear_weight must have at least one class (row)")
        params = _ops.make_params(log_end, bonus_weight, label_smoothing, eps)
        out = run_linear(chosen, x, linear_weight, linear_bias, tgt, weight, ignore_index,
                         _ops.TRANSFORMS["identity"], params, reduction, chunk_rows, class_tile)
    return out.reshape(target.shape) if reduction == "none" else out


class LinearEncouragingLoss(LossModule):
    """A classifier head (an nn.Linear(in_features, num_classes) as `linear_weight` and
    `linear_bias`) and the Encouraging Loss, fused: forward(input, target) =
    linear_encouraging_loss(input, self.linear_weight, target, self.linear_bias, weight=self.weight).
    `weight` (class weights) is kept as a buffer, as in EncouragingLoss."""

    _function = linear_encouraging_loss
    _options = _EL_OPTIONS + ("weight",)

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, *, weight: Optional[Tensor] = None,
                 log_end: float = 0.75, bonus_weight: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, eps: float = 1e-5, backend: str = "auto", device=None, dtype=None):
        check_el_options(log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
        super().__init__(log_end=log_end, bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, eps=eps, backend=backend)
        lin = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.linear_weight = lin.weight
        self.linear_bias = lin.bias
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_encouraging_loss(input, self.linear_weight, target, self.linear_bias, **self.options())

    def logits(self, input: Tensor) -> Tensor:
        return F.linear(input, self.linear_weight, self.linear_bias)

    def extra_repr(self):
        return (f"in_features={self.linear_weight.shape[1]}, num_classes={self.linear_weight.shape[0]}, "
                + super().extra_repr())

"""Margin-softmax heads (class-level metric learning) on the row-softmax kernels.

Each head normalizes the embeddings (N, D) and the class weight matrix (C, D) (nn.Linear's
layout; pytorch-metric-learning keeps the transpose, (D, C)), takes cos_j = x^ . w^_j, turns
the cosines into logits with the head's transform and applies cross-entropy or, with
bonus_weight > 0, the Encouraging Loss (../shared/spec/softmax.md):

    NormFace    z_j = s cos_j                                    (PML NormalizedSoftmaxLoss: s = 1/0.05)
    CosFace     z_j = s (cos_j - m [j == y])                     (PML CosFaceLoss: m = 0.35, s = 64)
    ArcFace     z_y = s cos(theta_y + m) if theta_y <= pi - m,   (PML ArcFaceLoss: m = 28.6 deg, s = 64)
                      s (cos_y - m sin m) otherwise; z_j = s cos_j
    Circle      z_y = g relu(1 + m - cos_y)(cos_y - 1 + m),      (class-level Circle loss, alphas
                z_j = g relu(cos_j + m)(cos_j - m)                detached; m = 0.25, g = 256)

With fused=True (default) the (N, C) cosine matrix never exists: the heads run on the fused
linear kernels over the normalized embeddings and class weights. With fused=False the cosines
are one dense GEMM and the transform + loss one fused row kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ext, _validate
from .ops import softmax as _ops
from .reference import softmax as _ref
from .softmax import check_el_options, check_target_range, run_linear

__all__ = [
    "normface_loss", "cosface_loss", "arcface_loss", "circle_class_loss",
    "NormFaceLoss", "CosFaceLoss", "ArcFaceLoss", "CircleClassLoss",
]

ARCFACE_DEFAULT_MARGIN = math.radians(28.6)  # PML's default, 0.4992 rad


def _margin_loss(kind, embeddings, weight, labels, t0, t1, *, log_end, bonus_weight, ignore_index, reduction,
                 label_smoothing, eps, fused, backend):
    log_end, bonus_weight, label_smoothing, eps = check_el_options(
        log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    _validate.tensor("weight", weight, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight must be (num_classes, D) with D={embeddings.shape[1]} (the embedding size), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != embeddings.dtype:
        raise TypeError(f"weight must have the embeddings' dtype {embeddings.dtype}, got {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (row)")
    _validate.same_device(embeddings=embeddings, weight=weight, labels=labels)
    C = weight.shape[0]
    check_target_range(labels, C, ignore_index, name="labels")
    op = "linear_softmax_loss" if fused else "softmax_loss"
    chosen = _ext.resolve_backend(backend, embeddings.device, op)
    if chosen == "reference":
        return _ref.margin_loss(kind, embeddings, weight, labels, t0, t1, log_end=log_end, bonus_weight=bonus_weight,
                                ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                eps=eps)
    params = _ops.make_params(log_end, bonus_weight, label_smoothing, eps, t0, t1)
    transform = _ops.TRANSFORM_IDS[kind]
    labels64 = labels.to(torch.int64)
    x = F.normalize(embeddings, p=2, dim=1, eps=1e-12)
    w = F.normalize(weight, p=2, dim=1, eps=1e-12)
    if fused:
        return run_linear(chosen, x, w, None, labels64, None, ignore_index, transform, params, reduction)
    cos = x @ w.T
    red = _ops.REDUCTION_IDS[reduction]
    compute_grad = torch.is_grad_enabled() and cos.requires_grad
    return _ops.softmax_loss(chosen, cos, labels64, None, ignore_index, transform, params, red, compute_grad)[0]


_COMMON_DOC = """
    Args:
        embeddings: (N, D) float; normalized inside.
        weight: (num_classes, D) class weights (nn.Linear's layout); normalized inside.
        labels: (N,) integer classes in [0, num_classes) or ignore_index.
        bonus_weight: 0 (default) gives cross-entropy as in pytorch-metric-learning; > 0 adds the
            Encouraging Loss bonus with log_end (see structloss_fast.encouraging_loss).
        ignore_index, reduction, label_smoothing, eps: as encouraging_loss.
        fused: never form the (N, C) cosines (chunked fused-linear kernels).
        backend: "auto" | "reference" | "cpu" | "triton".
"""


def normface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, scale: float = 20.0, log_end: float = 0.75,
                  bonus_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, eps: float = 1e-5, fused: bool = True,
                  backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    return _margin_loss("normface", embeddings, weight, labels, scale, 0.0, log_end=log_end, bonus_weight=bonus_weight,
                        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, eps=eps,
                        fused=fused, backend=backend)


def cosface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, margin: float = 0.35, scale: float = 64.0,
                 log_end: float = 0.75, bonus_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, eps: float = 1e-5, fused: bool = True,
                 backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0)
    return _margin_loss("cosface", embeddings, weight, labels, scale, margin, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


def arcface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, margin: float = ARCFACE_DEFAULT_MARGIN,
                 scale: float = 64.0, log_end: float = 0.75, bonus_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-5, fused: bool = True,
                 backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0, hi=math.pi / 2)
    return _margin_loss("arcface", embeddings, weight, labels, scale, margin, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


def circle_class_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, margin: float = 0.25,
                      gamma: float = 256.0, log_end: float = 0.75, bonus_weight: float = 0.0,
                      ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                      eps: float = 1e-5, fused: bool = True, backend: str = "auto") -> Tensor:
    gamma = _validate.number("gamma", gamma, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0, hi=1.0, hi_open=True)
    return _margin_loss("circle", embeddings, weight, labels, gamma, margin, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


normface_loss.__doc__ = "NormFace / normalized softmax: logits s cos_j (PML's temperature 0.05 is s = 20)." + _COMMON_DOC
cosface_loss.__doc__ = "CosFace / AM-Softmax: logits s (cos_j - m [j == y]) (PML's m = 0.35, s = 64)." + _COMMON_DOC
arcface_loss.__doc__ = ("ArcFace: target logit s cos(theta_y + m) (s (cos_y - m sin m) past pi - m), others "
                        "s cos_j. margin in radians; the default is PML's 28.6 degrees." + _COMMON_DOC)
circle_class_loss.__doc__ = ("Class-level Circle loss (Sun et al. 2020, Eq. 4 with class proxies): "
                             "z_y = gamma relu(1 + m - cos_y)(cos_y - 1 + m), z_j = gamma relu(cos_j + m)(cos_j - m), "
                             "alphas detached; the paper's face-recognition m = 0.25, gamma = 256." + _COMMON_DOC)


class _MarginHead(nn.Module):
    """Holds the class weights (num_classes, embedding_size) as an nn.Parameter, initialized
    like pytorch-metric-learning's (normal); forward(embeddings, labels) -> loss."""

    _fn = None

    def __init__(self, num_classes: int, embedding_size: int, *, fused: bool = True, backend: str = "auto",
                 log_end: float = 0.75, bonus_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-5, device=None, dtype=None,
                 **head_params):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight)
        self.head_params = head_params
        self.options = dict(fused=fused, backend=backend, log_end=log_end, bonus_weight=bonus_weight,
                            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, eps=eps)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return type(self)._fn(embeddings, self.weight, labels, **self.head_params, **self.options)

    def logits(self, embeddings: Tensor) -> Tensor:
        """Cosine similarities (N, num_classes) of the embeddings with the class weights."""
        return _ref.cosine_logits(embeddings, self.weight)

    def extra_repr(self):
        items = {**self.head_params, **self.options}
        return (f"num_classes={self.weight.shape[0]}, embedding_size={self.weight.shape[1]}, "
                + ", ".join(f"{k}={v!r}" for k, v in items.items()))


class NormFaceLoss(_MarginHead):
    _fn = staticmethod(normface_loss)

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 20.0, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, **kwargs)


class CosFaceLoss(_MarginHead):
    _fn = staticmethod(cosface_loss)

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)


class ArcFaceLoss(_MarginHead):
    _fn = staticmethod(arcface_loss)

    def __init__(self, num_classes: int, embedding_size: int, margin: float = ARCFACE_DEFAULT_MARGIN,
                 scale: float = 64.0, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)


class CircleClassLoss(_MarginHead):
    _fn = staticmethod(circle_class_loss)

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.25, gamma: float = 256.0, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, gamma=gamma, **kwargs)

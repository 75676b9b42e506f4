"""Margin-softmax heads (class-level metric learning) on the row-softmax kernels.

Each head normalizes the embeddings (N, D) and the class proxies (C, D) (nn.Linear's layout;
pytorch-metric-learning keeps the transpose, (D, C)), takes cos_j = x^ . w^_j, turns
the cosines into logits with the head's transform and applies cross-entropy or, with
bonus_weight > 0, the Encouraging Loss (docs/spec/softmax.md):

    NormFace    z_j = s cos_j                                    (PML NormalizedSoftmaxLoss: s = 1/0.05)
    CosFace     z_j = s (cos_j - m [j == y])                     (PML CosFaceLoss: m = 0.35, s = 64)
    ArcFace     z_y = s cos(theta_y + m) if theta_y <= pi - m,   (PML ArcFaceLoss: m = 28.6 deg, s = 64)
                      s (cos_y - m sin m) otherwise; z_j = s cos_j
    Circle      z_y = g relu(1 + m - cos_y)(cos_y - 1 + m),      (class-level Circle loss, alphas
                z_j = g relu(cos_j + m)(cos_j - m)                detached; m = 0.25, g = 256)

With fused=True (default) the (N, C) cosine matrix never exists: the heads run on the fused
linear kernels over the normalized embeddings and class proxies. With fused=False the cosines
are one dense GEMM and the transform + loss one fused row kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _registry, _validate
from .._module import LossModule
from . import _ops
from . import reference as _ref
from .encouraging import check_class_weight, check_el_options, check_target_range, run_linear

__all__ = [
    "normface_loss", "cosface_loss", "arcface_loss", "circle_class_loss",
    "NormFaceLoss", "CosFaceLoss", "ArcFaceLoss", "CircleClassLoss", "MarginHead",
]

ARCFACE_DEFAULT_MARGIN = math.radians(28.6)  # PML's default, 0.4992 rad


def _margin_loss(kind, embeddings, proxies, labels, t0, t1, *, weight, log_end, bonus_weight, ignore_index, reduction,
                 label_smoothing, eps, fused, backend, pool=None):
    """pool: None, or (pool name of _ops.POOLS, centers per class K, its parameter) for heads whose
    proxies hold K centers per class (rows c K .. c K + K - 1)."""
    log_end, bonus_weight, label_smoothing, eps, ignore_index = check_el_options(
        log_end, bonus_weight, label_smoothing, eps, ignore_index, reduction)
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    _validate.tensor("proxies", proxies, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    group = 1 if pool is None else pool[1]
    if proxies.shape[1] != embeddings.shape[1]:
        layout = "num_classes" if group == 1 else f"num_classes * {group}"
        raise ValueError(f"proxies must be ({layout}, D) with D={embeddings.shape[1]} (the embedding size), "
                         f"got shape {tuple(proxies.shape)}")
    if proxies.shape[0] == 0:
        raise ValueError("proxies must have at least one class (row)")
    if proxies.shape[0] % group:
        raise ValueError(f"proxies must have {group} rows (centers) per class, got {proxies.shape[0]} rows")
    C = proxies.shape[0] // group
    weight = check_class_weight("weight", weight, C)
    _validate.same_device(embeddings=embeddings, proxies=proxies, labels=labels, weight=weight)
    check_target_range(labels, C, ignore_index, name="labels")
    op_name = (_ops.LINEAR_OP if pool is None else _ops.POOLED_OP) if fused else _ops.OP
    chosen = _registry.resolve(op_name, backend, embeddings.device)
    # Embeddings and proxies may differ in dtype (bfloat16 activations, float32 proxies): both are
    # taken in the promoted dtype (the products under autocast in the autocast dtype).
    dtype = _oplib.loss_dtype(embeddings, proxies)
    compute = torch.promote_types(embeddings.dtype, proxies.dtype)
    embeddings, proxies = embeddings.to(compute), proxies.to(compute)
    if chosen == "reference":
        embeddings, proxies, weight = _oplib.loss_inputs(embeddings, proxies, weight)  # (float32 under autocast)
        with _oplib.autocast_off(embeddings.device):
            return _ref.margin_loss(kind, embeddings, proxies, labels, t0, t1, log_end=log_end,
                                    bonus_weight=bonus_weight, weight=weight, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing, eps=eps,
                                    pool=pool).to(dtype)
    params = _ops.make_params(log_end, bonus_weight, label_smoothing, eps, t0, t1)
    transform = _ops.TRANSFORMS[kind]
    labels64 = labels.to(torch.int64)
    x = F.normalize(embeddings, p=2, dim=1, eps=1e-12)
    w = F.normalize(proxies, p=2, dim=1, eps=1e-12)
    if fused and pool is not None:
        mask = [False, False]
        if reduction != "none" and torch.is_grad_enabled():
            mask = [x.requires_grad, w.requires_grad]
        # The op takes the centers group-major (center k of class c in row k C + c): its passes
        # over a row's classes are then contiguous.
        w = w.view(C, group, w.shape[1]).transpose(0, 1).reshape(group * C, w.shape[1])
        stats = _ops.run_pooled(chosen, x, w, labels64, weight, ignore_index, transform, params, _ops.POOLS[pool[0]],
                                group, pool[2], mask)
        return _ops.reduce(stats, labels64, weight, ignore_index, C, reduction).to(dtype)
    if fused:
        return run_linear(chosen, x, w, None, labels64, weight, ignore_index, transform, params, reduction)
    cos = x @ w.T
    if pool is not None:
        cos = _ref.pool_cosines(cos, *pool)
    compute_grad = torch.is_grad_enabled() and cos.requires_grad
    stats = _ops.run(chosen, cos, labels64, weight, ignore_index, transform, params, compute_grad)
    return _ops.reduce(stats, labels64, weight, ignore_index, C, reduction).to(dtype)


_COMMON_DOC = """
    Args:
        embeddings: (N, D) float; normalized inside.
        proxies: (num_classes, D) class proxies (nn.Linear's layout; pytorch-metric-learning keeps
            the transpose as `W`); normalized inside.
        labels: (N,) integer classes in [0, num_classes) or ignore_index.
        weight: optional (num_classes,) class weights of the loss, as F.cross_entropy's.
        bonus_weight: 0 (default) gives cross-entropy as in pytorch-metric-learning; > 0 adds the
            Encouraging Loss bonus with log_end (see structloss_fast.encouraging_loss).
        ignore_index, reduction, label_smoothing, eps: as encouraging_loss.
        fused: never form the (N, C) cosines (chunked fused-linear kernels).
        backend: "auto" | "reference" | "cpu" | "triton".
"""

# The options every head takes after its own parameters, with their defaults.
_HEAD_DEFAULTS = dict(weight=None, log_end=0.75, bonus_weight=0.0, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, eps=1e-5, fused=True, backend="auto")


def normface_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, scale: float = 20.0,
                  weight: Optional[Tensor] = None, log_end: float = 0.75, bonus_weight: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-5,
                  fused: bool = True, backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    return _margin_loss("normface", embeddings, proxies, labels, scale, 0.0, weight=weight, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


def cosface_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, margin: float = 0.35, scale: float = 64.0,
                 weight: Optional[Tensor] = None, log_end: float = 0.75, bonus_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-5,
                 fused: bool = True, backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0)
    return _margin_loss("cosface", embeddings, proxies, labels, scale, margin, weight=weight, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


def arcface_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, margin: float = ARCFACE_DEFAULT_MARGIN,
                 scale: float = 64.0, weight: Optional[Tensor] = None, log_end: float = 0.75,
                 bonus_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, eps: float = 1e-5, fused: bool = True,
                 backend: str = "auto") -> Tensor:
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    margin = _validate.number("margin", check_arcface_margin(margin), lo=0.0, hi=math.pi / 2)
    return _margin_loss("arcface", embeddings, proxies, labels, scale, margin, weight=weight, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


def circle_class_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, m: float = 0.25, gamma: float = 256.0,
                      weight: Optional[Tensor] = None, log_end: float = 0.75, bonus_weight: float = 0.0,
                      ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                      eps: float = 1e-5, fused: bool = True, backend: str = "auto") -> Tensor:
    gamma = _validate.number("gamma", gamma, lo=0.0, lo_open=True)
    m = _validate.number("m", m, lo=0.0, hi=1.0, hi_open=True)
    return _margin_loss("circle", embeddings, proxies, labels, gamma, m, weight=weight, log_end=log_end,
                        bonus_weight=bonus_weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, eps=eps, fused=fused, backend=backend)


normface_loss.__doc__ = "NormFace / normalized softmax: logits s cos_j (PML's temperature 0.05 is s = 20)." + _COMMON_DOC
cosface_loss.__doc__ = "CosFace / AM-Softmax: logits s (cos_j - m [j == y]) (PML's m = 0.35, s = 64)." + _COMMON_DOC
arcface_loss.__doc__ = ("ArcFace: target logit s cos(theta_y + m) (s (cos_y - m sin m) past pi - m), others "
                        "s cos_j. margin in radians; the default is PML's 28.6 degrees." + _COMMON_DOC)
circle_class_loss.__doc__ = ("Class-level Circle loss (Sun et al. 2020, Eq. 4 with class proxies): "
                             "z_y = gamma relu(1 + m - cos_y)(cos_y - 1 + m), z_j = gamma relu(cos_j + m)(cos_j - m), "
                             "alphas detached; the paper's face-recognition m = 0.25, gamma = 256 (m and gamma as "
                             "in circle_loss)." + _COMMON_DOC)


class MarginHead(LossModule):
    """A margin-softmax head: the class proxies (num_classes, embedding_size) as an nn.Parameter,
    initialized like pytorch-metric-learning's (normal), the class weights (if any) as a
    buffer; forward(embeddings, labels) -> loss."""

    _head_options: tuple[str, ...] = ()

    def __init__(self, num_classes: int, embedding_size: int, *, device=None, dtype=None, **options):
        weight = options.pop("weight", None)
        super().__init__(**{**{k: v for k, v in _HEAD_DEFAULTS.items() if k != "weight"}, **options})
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))
        nn.init.normal_(self.proxies)
        self.register_buffer("weight", weight)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return type(self)._function(embeddings, self.proxies, labels, **self.options())

    # pytorch-metric-learning's class-weight losses keep W = proxies.T, (embedding_size, num_classes).
    _PML_WEIGHT = "W"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also loads a PML state_dict: its W (embedding_size, num_classes) becomes proxies (the
        transpose); a W of another shape is reported with both layouts."""
        w_key, p_key = prefix + self._PML_WEIGHT, prefix + "proxies"
        if w_key in state_dict and p_key not in state_dict:
            W = state_dict.pop(w_key)
            C, D = self.proxies.shape
            if tuple(W.shape) != (D, C):
                error_msgs.append(f"{type(self).__name__}: pytorch-metric-learning's {w_key} must be (embedding_size, "
                                  f"num_classes) = ({D}, {C}) (this loss keeps proxies (num_classes, embedding_size) = "
                                  f"({C}, {D})), got {tuple(W.shape)}")
                return
            state_dict[p_key] = W.t()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_pml(cls, pml_loss, **options):
        """This loss with the settings and class weights of pytorch-metric-learning's loss of the
        same name (its margin read in the unit this loss takes; see each class)."""
        if type(pml_loss).__name__ != cls.__name__:
            raise TypeError(f"{cls.__name__}.from_pml takes pytorch-metric-learning's {cls.__name__}, got "
                            f"{type(pml_loss).__name__}")
        W = pml_loss.W.detach()
        kw = {**cls._pml_settings(pml_loss), **options}
        out = cls(W.shape[1], W.shape[0], device=W.device, dtype=W.dtype, **kw)
        with torch.no_grad():
            out.proxies.copy_(W.t())
        return out

    @classmethod
    def _pml_settings(cls, pml_loss) -> dict:
        return {}

    def logits(self, embeddings: Tensor) -> Tensor:
        """Cosine similarities (N, num_classes) of the embeddings with the class proxies."""
        return _ref.cosine_logits(embeddings, self.proxies)

    def extra_repr(self):
        return (f"num_classes={self.proxies.shape[0]}, embedding_size={self.proxies.shape[1]}, "
                + super().extra_repr())


def _head_options(*own: str) -> tuple[str, ...]:
    return own + tuple(_HEAD_DEFAULTS)


class NormFaceLoss(MarginHead):
    _function = normface_loss
    _options = _head_options("scale")

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 20.0, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, **kwargs)


class CosFaceLoss(MarginHead):
    _function = cosface_loss
    _options = _head_options("margin", "scale")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)

    @classmethod
    def _pml_settings(cls, pml_loss):
        return dict(margin=float(pml_loss.margin), scale=float(pml_loss.scale))  # a cosine margin in both


def check_arcface_margin(margin):
    """ArcFace's angular margin is in radians here; PML's ArcFaceLoss takes degrees. A number
    that only makes sense in degrees gets an error that says so."""
    if isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.pi / 2 < margin <= 180:
        raise ValueError(f"margin must be in radians in [0, pi/2], got {margin}: pytorch-metric-learning's "
                         f"ArcFaceLoss takes degrees (its default 28.6 degrees is {math.radians(28.6):.4f} radians); "
                         f"pass math.radians({margin}) = {math.radians(margin):.4f}, or build the loss with "
                         f"ArcFaceLoss.from_pml(pml_loss)")
    return margin


class ArcFaceLoss(MarginHead):
    """ArcFace head. margin in radians (PML's ArcFaceLoss takes degrees: 28.6 degrees = 0.4992 rad,
    the default here); proxies (num_classes, embedding_size), PML's W transposed. A PML
    state_dict loads as is (load_state_dict transposes W); ArcFaceLoss.from_pml(pml_loss) copies
    a PML loss, margin converted."""

    _function = arcface_loss
    _options = _head_options("margin", "scale")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = ARCFACE_DEFAULT_MARGIN,
                 scale: float = 64.0, **kwargs):
        super().__init__(num_classes, embedding_size, margin=check_arcface_margin(margin), scale=scale, **kwargs)

    @classmethod
    def _pml_settings(cls, pml_loss):
        # PML converts its degrees to radians when it is built (ArcFaceLoss.init_margin).
        return dict(margin=float(pml_loss.margin), scale=float(pml_loss.scale))


class CircleClassLoss(MarginHead):
    _function = circle_class_loss
    _options = _head_options("m", "gamma")

    def __init__(self, num_classes: int, embedding_size: int, m: float = 0.25, gamma: float = 256.0, **kwargs):
        super().__init__(num_classes, embedding_size, m=m, gamma=gamma, **kwargs)

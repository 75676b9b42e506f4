"""The proxy losses of pytorch-metric-learning (PML) on the softmax family's kernels
(docs/spec/softmax.md): each compares the embeddings (N, D) with learned class proxies and would,
written densely, build the N x C (or N x C K) similarity matrix, which these never do.

    NormalizedSoftmax  cross-entropy of cos / temperature          (the fused linear kernels)
    ProxyNCA           cross-entropy of -softmax_scale ||x^ - p^||^2 = 2 softmax_scale cos + const
    SubCenterArcFace   ArcFace on the best of K sub-centers per class  (pooled fused linear)
    SoftTriple         CosFace-style margin on a soft average of K centers per class (pooled)
    ProxyAnchor        per-proxy log-sum-exps over the batch (its own op: column statistics)

Proxies are (C, D) (C K rows for K centers per class, class c in rows c K .. c K + K - 1),
nn.Linear's layout; PML keeps ProxyAnchor's as (C, D) and the others' transposed as `W` / `fc`.
The Modules hold them as the nn.Parameter `proxies`, initialized as PML's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _registry, _validate
from .._ids import ProxyAnchorStat
from .._module import LossModule
from . import _ops
from . import reference as _ref
from .encouraging import check_target_range
from .margin_heads import ARCFACE_DEFAULT_MARGIN, MarginHead, _HEAD_DEFAULTS, _head_options, _margin_loss, normface_loss

__all__ = [
    "normalized_softmax_loss", "proxy_nca_loss", "subcenter_arcface_loss", "soft_triple_loss", "proxy_anchor_loss",
    "NormalizedSoftmaxLoss", "ProxyNCALoss", "SubCenterArcFaceLoss", "SoftTripleLoss", "ProxyAnchorLoss",
]

_HEAD_DOC = """
    Other arguments as normface_loss: weight, log_end, bonus_weight (0: cross-entropy, as PML),
    ignore_index, reduction, label_smoothing, eps, fused, backend."""


def normalized_softmax_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, temperature: float = 0.05,
                            **head_options) -> Tensor:
    """PML's NormalizedSoftmaxLoss: cross-entropy of cos(x, p_j) / temperature; normface_loss with
    scale = 1 / temperature."""
    temperature = _validate.number("temperature", temperature, lo=0.0, lo_open=True)
    return normface_loss(embeddings, proxies, labels, scale=1.0 / temperature, **head_options)


normalized_softmax_loss.__doc__ += _HEAD_DOC


def _smallest_log_prob(dtype) -> float:
    """log of the smallest probability that exp does not round to 0 in dtype (half the smallest
    subnormal): below it PML's softmax gives p = 0."""
    info = torch.finfo(dtype)
    return math.log(info.smallest_normal) + math.log(info.eps) - math.log(2.0)


def proxy_nca_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, softmax_scale: float = 1.0,
                   reduction: str = "mean", fused: bool = True, backend: str = "auto") -> Tensor:
    """PML's ProxyNCALoss: -log softmax_j(-softmax_scale ||x^ - p^_j||^2) at the label, the
    distances of the normalized embeddings and proxies; equal to cross-entropy of
    2 softmax_scale cos(x, p_j) (the constant drops out of the softmax). PML leaves out the rows
    whose probability rounds to 0 in the embeddings' dtype and averages over the others: so does
    this, when the scale makes that possible (4 softmax_scale + log C beyond -log of the smallest
    probability; never at the default). backend: "auto" | "reference" | "cpu" | "triton"."""
    softmax_scale = _validate.number("softmax_scale", softmax_scale, lo=0.0, lo_open=True)
    _validate.reduction(reduction)
    _validate.tensor("proxies", proxies, ndim=2, floating=True)
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    if _registry.resolve(_ops.LINEAR_OP if fused else _ops.OP, backend, embeddings.device) == "reference":
        _margin_loss_checks(embeddings, proxies, labels)
        dtype = _oplib.loss_dtype(embeddings, proxies)
        emb, prox = _oplib.loss_inputs(embeddings, proxies)  # (float32 under autocast)
        with _oplib.autocast_off(embeddings.device):
            return _ref.proxy_nca_loss(emb, prox, labels, softmax_scale, reduction).to(dtype)
    head = dict(fused=fused, backend=backend)
    C = max(proxies.shape[0], 1)
    # The largest row loss is below the largest logit gap 4 softmax_scale plus log C.
    if 4 * softmax_scale + math.log(C) < -_smallest_log_prob(embeddings.dtype):
        return normface_loss(embeddings, proxies, labels, scale=2 * softmax_scale, reduction=reduction, **head)
    rows = normface_loss(embeddings, proxies, labels, scale=2 * softmax_scale, reduction="none", **head)
    keep = torch.exp(-rows.detach()) != 0
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp_min(1).to(rows.dtype)


def _margin_loss_checks(embeddings, proxies, labels):
    """The head's input checks, for the reference paths that bypass _margin_loss."""
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    if proxies.shape[1] != embeddings.shape[1] or proxies.shape[0] == 0:
        raise ValueError(f"proxies must be (num_classes, D) with D={embeddings.shape[1]} and num_classes >= 1, "
                         f"got shape {tuple(proxies.shape)}")
    _validate.same_device(embeddings=embeddings, proxies=proxies, labels=labels)
    check_target_range(labels, proxies.shape[0], -100, name="labels")


def _group(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def subcenter_arcface_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, sub_centers: int = 3,
                           margin: float = ARCFACE_DEFAULT_MARGIN, scale: float = 64.0, **head_options) -> Tensor:
    """PML's SubCenterArcFaceLoss (Deng et al., ECCV 2020): the cosine of a class is the largest of
    its sub_centers sub-centers' (proxies (num_classes * sub_centers, D), class c in rows
    c K .. c K + K - 1), then ArcFace (margin in radians; default PML's 28.6 degrees). The
    gradient of a class reaches its best sub-center only."""
    K = _group("sub_centers", sub_centers)
    scale = _validate.number("scale", scale, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0, hi=math.pi / 2)
    opts = {**{k: v for k, v in _HEAD_DEFAULTS.items()}, **head_options}
    return _margin_loss("arcface", embeddings, proxies, labels, scale, margin, pool=("max", K, 0.0), **opts)


subcenter_arcface_loss.__doc__ += _HEAD_DOC


def soft_triple_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, centers_per_class: int = 10,
                     la: float = 20.0, gamma: float = 0.1, margin: float = 0.01, **head_options) -> Tensor:
    """PML's SoftTripleLoss (Qian et al., ICCV 2019): the similarity to class c is the soft average
    sum_k softmax_k(s_ck / gamma) s_ck over its centers_per_class centers (proxies
    (num_classes * K, D)), then cross-entropy of la (sim_c - margin [c = y])."""
    K = _group("centers_per_class", centers_per_class)
    la = _validate.number("la", la, lo=0.0, lo_open=True)
    gamma = _validate.number("gamma", gamma, lo=0.0, lo_open=True)
    margin = _validate.number("margin", margin, lo=0.0)
    opts = {**{k: v for k, v in _HEAD_DEFAULTS.items()}, **head_options}
    return _margin_loss("cosface", embeddings, proxies, labels, la, margin, pool=("soft_avg", K, 1.0 / gamma), **opts)


soft_triple_loss.__doc__ += _HEAD_DOC


def proxy_anchor_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, *, margin: float = 0.1,
                      alpha: float = 32.0, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """PML's ProxyAnchorLoss (Kim et al., CVPR 2020), cosine similarity: per proxy c,
    pos_c = log(1 + sum_{i: y_i = c} e^{-alpha (s_ic - margin)}) and
    neg_c = log(1 + sum_{i: y_i != c} e^{alpha (s_ic + margin)}); "mean" is
    sum_c pos_c / (proxies with a row in the batch) + sum_c neg_c / C; "sum" adds all terms and
    "none" returns pos_c + neg_c per proxy, (C,). Row chunks with an online log-sum-exp per
    proxy: the N x C similarities never exist. backend: "auto" | "reference" | "cpu"."""
    margin = _validate.number("margin", margin)
    alpha = _validate.number("alpha", alpha, lo=0.0, lo_open=True)
    _validate.reduction(reduction)
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    _validate.tensor("proxies", proxies, ndim=2, floating=True)
    _margin_loss_checks(embeddings, proxies, labels)
    if proxies.dtype != embeddings.dtype:
        raise TypeError(f"proxies must have the embeddings' dtype {embeddings.dtype}, got {proxies.dtype}")
    chosen = _registry.resolve(_ops.PROXY_ANCHOR_OP, backend, embeddings.device)
    dtype = _oplib.loss_dtype(embeddings, proxies)  # float32 under autocast, as F.cross_entropy
    if chosen == "reference":
        emb, prox = _oplib.loss_inputs(embeddings, proxies)
        with _oplib.autocast_off(embeddings.device):
            return _ref.proxy_anchor_loss(emb, prox, labels, margin, alpha, reduction).to(dtype)
    compute = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
    x = F.normalize(embeddings.to(compute), p=2, dim=1, eps=1e-12)
    p = F.normalize(proxies.to(compute), p=2, dim=1, eps=1e-12)
    stats = _ops.run_proxy_anchor(chosen, x, p, labels.to(torch.int64), alpha, margin)
    pos, neg = stats[:, ProxyAnchorStat.POS_TERM], stats[:, ProxyAnchorStat.NEG_TERM]
    if reduction == "none":
        out = pos + neg
    elif reduction == "sum":
        out = pos.sum() + neg.sum()
    else:
        n_with = (stats[:, ProxyAnchorStat.NUM_POS].detach() > 0).sum().to(pos.dtype)
        out = pos.sum() / n_with.clamp_min(1) + neg.sum() / proxies.shape[0]
    return out.to(dtype)


# ---------------------------------------------------------------- Modules


class NormalizedSoftmaxLoss(MarginHead):
    _function = normalized_softmax_loss
    _options = _head_options("temperature")

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs):
        super().__init__(num_classes, embedding_size, temperature=temperature, **kwargs)


class _ProxyModule(LossModule):
    """proxies (num_classes, embedding_size) as an nn.Parameter; forward(embeddings, labels)."""

    def __init__(self, num_classes: int, embedding_size: int, *, device=None, dtype=None, **options):
        super().__init__(**options)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None) -> Tensor:
        if indices_tuple is not None:
            raise NotImplementedError(f"{type(self).__name__}: miner weights (indices_tuple) are not supported")
        return type(self)._function(embeddings, self.proxies.to(embeddings.dtype), labels, **self.options())

    def extra_repr(self):
        return (f"num_classes={self.proxies.shape[0]}, embedding_size={self.proxies.shape[1]}, "
                + super().extra_repr())


class ProxyNCALoss(_ProxyModule):
    """PML's ProxyNCALoss; proxies initialized from a standard normal, as PML's."""

    _function = proxy_nca_loss
    _options = ("softmax_scale", "reduction", "fused", "backend")

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1.0, reduction: str = "mean",
                 fused: bool = True, backend: str = "auto", **kwargs):
        super().__init__(num_classes, embedding_size, softmax_scale=softmax_scale, reduction=reduction, fused=fused,
                         backend=backend, **kwargs)
        nn.init.normal_(self.proxies)


class ProxyAnchorLoss(_ProxyModule):
    """PML's ProxyAnchorLoss; proxies initialized with kaiming_normal_(mode="fan_out"), as PML's."""

    _function = proxy_anchor_loss
    _options = ("margin", "alpha", "reduction", "backend")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0,
                 reduction: str = "mean", backend: str = "auto", **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, alpha=alpha, reduction=reduction,
                         backend=backend, **kwargs)
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")


class SubCenterArcFaceLoss(MarginHead):
    """PML's SubCenterArcFaceLoss: proxies (num_classes * sub_centers, embedding_size), class c in
    rows c K .. c K + K - 1 (PML's W transposed); margin in radians."""

    _function = subcenter_arcface_loss
    _options = _head_options("sub_centers", "margin", "scale")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = ARCFACE_DEFAULT_MARGIN,
                 scale: float = 64.0, sub_centers: int = 3, **kwargs):
        K = _group("sub_centers", sub_centers)
        super().__init__(num_classes * K, embedding_size, sub_centers=K, margin=margin, scale=scale, **kwargs)
        self.num_classes = num_classes

    def logits(self, embeddings: Tensor) -> Tensor:
        """Each class's best sub-center cosine, (N, num_classes)."""
        return _ref.pool_cosines(_ref.cosine_logits(embeddings, self.proxies), "max", self.sub_centers, 0.0)

    @torch.no_grad()
    def get_outliers(self, embeddings: Tensor, labels: Tensor, threshold: float = 75, return_dominant_centers=True):
        """PML's outlier detection: for each class in the batch, its dominant sub-center (the one
        most of its samples are closest to) and the samples farther than `threshold` degrees from
        it. Returns the outliers' indices and, with return_dominant_centers, the dominant centers
        (num_classes, embedding_size) (zero for classes absent from the batch)."""
        K, C = self.sub_centers, self.num_classes
        cos = _ref.cosine_logits(embeddings, self.proxies).view(-1, C, K)
        own = cos[torch.arange(labels.shape[0], device=labels.device), labels]  # (N, K)
        votes = torch.zeros(C, K, dtype=torch.long, device=labels.device)
        votes.index_put_((labels, own.argmax(dim=1)), torch.ones_like(labels), accumulate=True)
        dominant = votes.argmax(dim=1)  # (C,)
        dominant_cos = own.gather(1, dominant[labels][:, None]).squeeze(1)
        outliers = (dominant_cos < math.cos(math.radians(threshold))).nonzero().flatten()
        if not return_dominant_centers:
            return outliers
        present = votes.sum(dim=1) > 0
        centers = self.proxies.view(C, K, -1)[torch.arange(C, device=labels.device), dominant]
        return outliers, torch.where(present[:, None], centers, torch.zeros_like(centers))


class SoftTripleLoss(MarginHead):
    """PML's SoftTripleLoss: proxies (num_classes * centers_per_class, embedding_size) (PML's `fc`
    transposed), initialized uniformly in +-1/sqrt(num_classes * centers_per_class) as PML's
    kaiming_uniform_(a=sqrt(5)) of its (embedding_size, C K) `fc`."""

    _function = soft_triple_loss
    _options = _head_options("centers_per_class", "la", "gamma", "margin")

    def __init__(self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20.0,
                 gamma: float = 0.1, margin: float = 0.01, **kwargs):
        K = _group("centers_per_class", centers_per_class)
        super().__init__(num_classes * K, embedding_size, centers_per_class=K, la=la, gamma=gamma, margin=margin,
                         **kwargs)
        self.num_classes = num_classes
        bound = 1.0 / math.sqrt(num_classes * K)
        nn.init.uniform_(self.proxies, -bound, bound)

    def logits(self, embeddings: Tensor) -> Tensor:
        """Each class's soft-averaged similarity, (N, num_classes)."""
        return _ref.pool_cosines(_ref.cosine_logits(embeddings, self.proxies), "soft_avg", self.centers_per_class,
                                 1.0 / self.gamma)

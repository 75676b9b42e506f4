"""Pairwise metric-learning losses on the fused engine (docs/spec/pairwise.md).

Each loss takes embeddings (B, D) and integer labels (B,), optionally a separate reference
set (ref_embeddings (M, D), ref_labels (M,)); without references, every other row of the
batch is a reference and self-pairs are excluded. Semantics and defaults are those of
pytorch-metric-learning (PML): CosineSimilarity or LpDistance on normalized embeddings and each
class's default reducer, so the modules are drop-in replacements for PML's classes (differences
documented in structloss_fast/pairwise/reference.py).

reduction="none" returns one value per anchor: its loss for the per-anchor losses, the sum of its
pair (or triplet) losses for the pair-level ones (NT-Xent, contrastive, triplet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _oplib, _registry, _validate
from .._ids import PairGradMode
from .._module import LossModule
from . import _ops
from . import reference as _ref


def check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index=None):
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        _validate.tensor("ref_embeddings", ref_embeddings, ndim=2, floating=True)
        _validate.tensor("ref_labels", ref_labels, ndim=1, integer=True)
        _validate.length("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_embeddings must have the embedding size of embeddings ({embeddings.shape[1]}), "
                f"got shape {tuple(ref_embeddings.shape)}"
            )
    if ref_self_index is not None:
        if ref_embeddings is None:
            raise ValueError("ref_self_index needs ref_embeddings")
        ref_self_index = _validate.integer("ref_self_index", ref_self_index)
        if not 0 <= ref_self_index < max(ref_embeddings.shape[0], 1):
            raise ValueError(f"ref_self_index must be in [0, {ref_embeddings.shape[0]}), got {ref_self_index}")
    _validate.same_device(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels)


def prepare(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, backend_name):
    """Normalized operands for the ops: (x, labels64, ref, ref_labels64, self_offset, ref_is_x)."""
    low_precision = embeddings.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if low_precision else embeddings.dtype
    # Contiguous: the Triton kernels read the rows with unit stride (transposed or sliced inputs).
    x = F.normalize(embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12).contiguous()
    labels64 = labels.to(torch.int64).contiguous()
    if ref_embeddings is None:
        ref, ref_lab64, self_offset, ref_is_x = x, labels64, 0, True
    else:
        ref = F.normalize(ref_embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12).contiguous()
        ref_lab64 = ref_labels.to(torch.int64).contiguous()
        self_offset = -1 if ref_self_index is None else int(ref_self_index)
        ref_is_x = False
    if backend_name == "triton" and low_precision:
        # Triton reads fp16/bf16 tiles directly (tensor cores) and accumulates in fp32; the tiles
        # are rows of unit stride (the kernels' wrapper copies other layouts): convert into that
        # layout in the one copy made here (F.normalize keeps a transposed input's layout).
        x = x.to(embeddings.dtype, memory_format=torch.contiguous_format)
        ref = x if ref_is_x else ref.to(embeddings.dtype, memory_format=torch.contiguous_format)
    return x, labels64, ref, ref_lab64, self_offset, ref_is_x


def loss_terms(loss_name, params, embeddings, labels, ref_embeddings=None, ref_labels=None, ref_self_index=None,
               backend="auto"):
    """Unreduced: per-anchor terms (B, terms) with gradient, and the row statistics (B, 8) that
    hold each term's reducer count. The building block of reductions across processes
    (DistributedPairwiseLoss); `params` as validated by the loss's functional API."""
    check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    loss_id = _ops.LOSSES[loss_name]
    chosen = _ops.resolve(backend, embeddings, loss_id, ref_embeddings)
    if chosen == "reference":
        raise _registry.BackendUnavailable("loss_terms needs a compiled or Triton backend (the reference reduces densely)")
    x, lab, ref, ref_lab, self_offset, ref_is_x = prepare(embeddings, labels, ref_embeddings, ref_labels,
                                                          ref_self_index, chosen)
    stats = _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, params, PairGradMode.NONE)
    return _ops.row_terms(stats, loss_id).to(embeddings.dtype), stats.detach()


def _run(loss_name, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
         ref_self_index=None):
    check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    _validate.reduction(reduction)
    loss_id = _ops.LOSSES[loss_name]
    chosen = _ops.resolve(backend, embeddings, loss_id, ref_embeddings)
    dtype = _oplib.loss_dtype(embeddings)
    if chosen == "reference":
        emb, ref_emb = _oplib.loss_inputs(embeddings, ref_embeddings)  # (float32 under autocast)
        with _oplib.autocast_off(embeddings.device):
            return reference_fn(emb, labels, *params, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                reduction=reduction, ref_self_index=ref_self_index).to(dtype)
    x, lab, ref, ref_lab, self_offset, ref_is_x = prepare(embeddings, labels, ref_embeddings, ref_labels,
                                                          ref_self_index, chosen)
    grad_mode = PairGradMode.NONE
    # The compiled kernels form the gradient in the forward pass (mean/sum weight every anchor of
    # a term alike): on CPU for every loss (contrastive's two terms split by sign), with CUDA for
    # one-term losses. Triton recomputes it in the backward, flash-attention style.
    fused = chosen == "cpu" or (chosen == "cuda" and _ops.terms(loss_id) == 1)
    if reduction != "none" and fused and torch.is_grad_enabled():
        if embeddings.requires_grad:
            grad_mode = PairGradMode.X
        if ref_embeddings is not None and ref_embeddings.requires_grad:
            grad_mode = PairGradMode.X_REF
    stats = _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, params, grad_mode)
    # Non-finite embeddings give NaN even when the labels leave no term to carry it.
    return _ref.nan_unless_finite(_ops.reduce(stats, loss_id, reduction).to(dtype), embeddings, ref_embeddings)


_COMMON_DOC = """
    Common arguments:
        embeddings: (B, D), float16/bfloat16/float32/float64, any strides; normalized inside.
        labels: (B,) integer class labels (any integer dtype).
        ref_embeddings, ref_labels: optional (M, D) / (M,) references (e.g. a memory queue); they
            receive gradient if they require it.
        reduction: "mean" (the PML reducer's average) | "sum" | "none" (per anchor).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".
        ref_self_index: with references, anchor i is reference (ref_self_index + i) mod M (the pair
            is excluded from the positives), as for a batch just written into a memory queue.
"""


def _circle_params(m, gamma):
    return (_validate.number("m", m, lo=0.0, hi=1.0, hi_open=True), _validate.number("gamma", gamma, lo=0.0, lo_open=True))


def _ms_params(alpha, beta, base):
    return (_validate.number("alpha", alpha, lo=0.0, lo_open=True), _validate.number("beta", beta, lo=0.0, lo_open=True),
            _validate.number("base", base))


def _temperature_params(temperature):
    return (_validate.number("temperature", temperature, lo=0.0, lo_open=True),)


def _contrastive_params(pos_margin, neg_margin):
    return (_validate.number("pos_margin", pos_margin), _validate.number("neg_margin", neg_margin))


def _triplet_spec(margin, mining):
    margin = _validate.number("margin", margin)
    if mining not in ("all", "batch_hard"):
        raise ValueError(f"mining must be 'all' or 'batch_hard', got {mining!r}")
    return ("triplet_all" if mining == "all" else "triplet_hard"), (margin,)


def circle_loss(embeddings: Tensor, labels: Tensor, *, m: float = 0.4, gamma: float = 80.0,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Circle loss with pair-level labels (Sun et al., CVPR 2020), as PML's CircleLoss: cosine
    similarities, alphas detached, rows without a positive or a negative give 0, "mean"
    averages the non-zero row losses. m: relaxation margin in [0, 1); gamma: scale > 0."""
    return _run("circle", _circle_params(m, gamma), _ref.circle_loss, embeddings, labels, ref_embeddings, ref_labels, reduction,
                backend, ref_self_index)


def unified_loss(embeddings: Tensor, labels: Tensor, *, m: float = 0.35, gamma: float = 64.0,
                 ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                 backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """The Circle paper's unified loss (Eq. 1), pair-level:
    softplus(LSE_N gamma (s_n + m) + LSE_P (-gamma s_p)); same reduction as circle_loss.
    Its class-level form is AM-Softmax/CosFace, whose defaults (m = 0.35, gamma = 64) it takes."""
    return _run("unified", _circle_params(m, gamma), _ref.unified_loss, embeddings, labels, ref_embeddings, ref_labels, reduction,
                backend, ref_self_index)


def multi_similarity_loss(embeddings: Tensor, labels: Tensor, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                          reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019), as PML's MultiSimilarityLoss (no miner):
    (1/alpha) log(1 + sum_P e^{-alpha (s - base)}) + (1/beta) log(1 + sum_N e^{beta (s - base)}),
    "mean" over all anchors. alpha, beta > 0."""
    return _run("multi_similarity", _ms_params(alpha, beta, base), _ref.multi_similarity_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend, ref_self_index)


def supcon_loss(embeddings: Tensor, labels: Tensor, *, temperature: float = 0.1,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), as PML's SupConLoss:
    -(1/|P|) sum_P [s_p/t - LSE_{P u N} s/t] per anchor, "mean" over the non-zero anchor losses;
    0 when the batch has no positive or no negative pair. temperature > 0."""
    return _run("supcon", _temperature_params(temperature), _ref.supcon_loss, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
                ref_self_index)


def ntxent_loss(embeddings: Tensor, labels: Tensor, *, temperature: float = 0.07,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """NT-Xent / InfoNCE (Chen et al. 2020) with label-defined positives, as PML's NTXentLoss:
    for every positive pair, -log(e^{s_p/t} / (e^{s_p/t} + sum_N e^{s_n/t})), "mean" over all
    positive pairs. O(B) state per anchor (PML builds a positives x negatives tensor)."""
    return _run("ntxent", _temperature_params(temperature), _ref.ntxent_loss, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
                ref_self_index)


def contrastive_loss(embeddings: Tensor, labels: Tensor, *, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                     backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006), as PML's ContrastiveLoss: Euclidean distances of the
    normalized embeddings, relu(d - pos_margin) for positive pairs and relu(neg_margin - d) for
    negative pairs, each averaged over its non-zero pair losses, then added."""
    return _run("contrastive", _contrastive_params(pos_margin, neg_margin), _ref.contrastive_loss, embeddings, labels, ref_embeddings, ref_labels,
                reduction, backend, ref_self_index)


def triplet_margin_loss(embeddings: Tensor, labels: Tensor, *, margin: float = 0.05, mining: str = "all",
                        ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                        reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Triplet margin loss, as PML's TripletMarginLoss: Euclidean distances of the normalized
    embeddings, relu(d_ap - d_an + margin), "mean" over the non-zero triplet losses.
    mining="all": every (anchor, positive, negative) triplet (PML's default; here in O(M log M)
    per anchor, never materialized); "batch_hard": each anchor's hardest positive and hardest
    negative (PML's BatchHardMiner)."""
    name, params = _triplet_spec(margin, mining)

    def reference(*args, **kw):
        return _ref.triplet_margin_loss(*args, mining=mining, **kw)

    return _run(name, params, reference, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
                ref_self_index)


for _fn in (circle_loss, unified_loss, multi_similarity_loss, supcon_loss, ntxent_loss, contrastive_loss,
            triplet_margin_loss):
    _fn.__doc__ += _COMMON_DOC


class PairwiseLoss(LossModule):
    """The Module form of a pairwise loss, called as loss_fn(embeddings, labels) like
    pytorch-metric-learning's losses (ref_emb / ref_labels / ref_self_index as its
    CrossBatchMemory passes them)."""

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, ref_self_index=None):
        if indices_tuple is not None:
            raise NotImplementedError(
                f"{type(self).__name__} computes all pairs; miners (indices_tuple) are not supported"
            )
        return type(self)._function(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                    ref_self_index=ref_self_index, **self.options())

    def spec(self) -> tuple[str, tuple]:
        """(engine loss name, validated parameters): what DistributedPairwiseLoss and
        CrossBatchMemory need to run this loss on other references."""
        raise NotImplementedError


class CircleLoss(PairwiseLoss):
    _function = circle_loss
    _options = ("m", "gamma", "reduction", "backend")

    def __init__(self, m: float = 0.4, gamma: float = 80.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__(m=m, gamma=gamma, reduction=reduction, backend=backend)

    def spec(self):
        return "circle", _circle_params(self.m, self.gamma)


class UnifiedLoss(PairwiseLoss):
    _function = unified_loss
    _options = ("m", "gamma", "reduction", "backend")

    def __init__(self, m: float = 0.35, gamma: float = 64.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__(m=m, gamma=gamma, reduction=reduction, backend=backend)

    def spec(self):
        return "unified", _circle_params(self.m, self.gamma)


class MultiSimilarityLoss(PairwiseLoss):
    _function = multi_similarity_loss
    _options = ("alpha", "beta", "base", "reduction", "backend")

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__(alpha=alpha, beta=beta, base=base, reduction=reduction, backend=backend)

    def spec(self):
        return "multi_similarity", _ms_params(self.alpha, self.beta, self.base)


class SupConLoss(PairwiseLoss):
    _function = supcon_loss
    _options = ("temperature", "reduction", "backend")

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", backend: str = "auto"):
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

    def spec(self):
        return "supcon", _temperature_params(self.temperature)


class NTXentLoss(PairwiseLoss):
    _function = ntxent_loss
    _options = ("temperature", "reduction", "backend")

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto"):
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

    def spec(self):
        return "ntxent", _temperature_params(self.temperature)


class ContrastiveLoss(PairwiseLoss):
    _function = contrastive_loss
    _options = ("pos_margin", "neg_margin", "reduction", "backend")

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, reduction=reduction, backend=backend)

    def spec(self):
        return "contrastive", _contrastive_params(self.pos_margin, self.neg_margin)


class TripletMarginLoss(PairwiseLoss):
    _function = triplet_margin_loss
    _options = ("margin", "mining", "reduction", "backend")

    def __init__(self, margin: float = 0.05, mining: str = "all", reduction: str = "mean", backend: str = "auto"):
        super().__init__(margin=margin, mining=mining, reduction=reduction, backend=backend)

    def spec(self):
        return _triplet_spec(self.margin, self.mining)

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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _registry, _validate
from .._ids import PairGradMode, PairStat
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
        if isinstance(ref_self_index, bool) or not isinstance(ref_self_index, int):
            raise TypeError(f"ref_self_index must be an int, got {type(ref_self_index).__name__}")
        if not 0 <= ref_self_index < max(ref_embeddings.shape[0], 1):
            raise ValueError(f"ref_self_index must be in [0, {ref_embeddings.shape[0]}), got {ref_self_index}")
    _validate.same_device(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels)


def prepare(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, backend_name):
    """Normalized operands for the ops: (x, labels64, ref, ref_labels64, self_offset, ref_is_x)."""
    low_precision = embeddings.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if low_precision else embeddings.dtype
    x = F.normalize(embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12)
    labels64 = labels.to(torch.int64).contiguous()
    if ref_embeddings is None:
        ref, ref_lab64, self_offset, ref_is_x = x, labels64, 0, True
    else:
        ref = F.normalize(ref_embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12)
        ref_lab64 = ref_labels.to(torch.int64).contiguous()
        self_offset = -1 if ref_self_index is None else int(ref_self_index)
        ref_is_x = False
    if backend_name == "triton" and low_precision:
        # Triton reads fp16/bf16 tiles directly (tensor cores) and accumulates in fp32.
        x = x.to(embeddings.dtype)
        ref = x if ref_is_x else ref.to(embeddings.dtype)
    return x, labels64, ref, ref_lab64, self_offset, ref_is_x


def loss_terms(loss_name, params, embeddings, labels, ref_embeddings=None, ref_labels=None, ref_self_index=None,
               backend="auto"):
    """Unreduced: per-anchor terms (B, terms) with gradient, and the row statistics (B, 8) that
    hold each term's reducer count. The building block of reductions across processes
    (DistributedPairwiseLoss); `params` as validated by the loss's functional API."""
    check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    loss_id = _ops.LOSSES[loss_name]
    chosen = _ops.resolve(backend, embeddings, loss_id)
    if chosen == "reference":
        raise _registry.BackendUnavailable("loss_terms needs a compiled or Triton backend (the reference reduces densely)")
    x, lab, ref, ref_lab, self_offset, ref_is_x = prepare(embeddings, labels, ref_embeddings, ref_labels,
                                                          ref_self_index, chosen)
    stats = _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, params, PairGradMode.NONE)
    return _ops.row_terms(stats, loss_id).to(embeddings.dtype), stats.detach()


def _stats(loss_name, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
           ref_self_index=None, row_params=None, reference_kw=None):
    """(row statistics, None) from a kernel, or (None, the loss) from the reference."""
    check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    _validate.reduction(reduction)
    loss_id = _ops.LOSSES[loss_name]
    chosen = _ops.resolve(backend, embeddings, loss_id)
    if chosen == "reference":
        return None, reference_fn(embeddings, labels, *params, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                                  reduction=reduction, ref_self_index=ref_self_index, **(reference_kw or {}))
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
    if row_params is not None:
        row_params = row_params.to(x.dtype)
    return _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, params, grad_mode, row_params), None


def _run(loss_name, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
         ref_self_index=None):
    stats, loss = _stats(loss_name, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction,
                         backend, ref_self_index)
    if stats is None:
        return loss
    return _ops.reduce(stats, _ops.LOSSES[loss_name], reduction).to(embeddings.dtype)


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


def _gen_lifted_params(pos_margin, neg_margin):
    return (_validate.number("pos_margin", pos_margin), _validate.number("neg_margin", neg_margin))


TUPLET_DEFAULT_MARGIN = math.radians(5.73)  # PML's default (5.73 degrees), 0.1000 rad


def _tuplet_params(margin, scale):
    margin = _validate.number("margin", margin, lo=0.0)
    if margin > math.pi / 2:
        raise ValueError(f"margin is an angle in radians, in [0, pi/2]; got {margin} (pytorch-metric-learning's "
                         f"TupletMarginLoss takes degrees: {margin} degrees is margin={math.radians(margin):.6g})")
    return margin, _validate.number("scale", scale, lo=0.0, lo_open=True)


def _fastap_params(num_bins):
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return (float(num_bins),)


def generalized_lifted_structure_loss(embeddings: Tensor, labels: Tensor, *, neg_margin: float = 1.0,
                                      pos_margin: float = 0.0, ref_embeddings: Tensor | None = None,
                                      ref_labels: Tensor | None = None, reduction: str = "mean",
                                      backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Generalized lifted structure loss (Hermans et al. 2017), as PML's
    GeneralizedLiftedStructureLoss: Euclidean distances of the normalized embeddings,
    relu(LSE_P (d - pos_margin) + LSE_N (neg_margin - d)) per anchor (an empty set's LSE is 0),
    "mean" over all anchors."""
    return _run("generalized_lifted_structure", _gen_lifted_params(pos_margin, neg_margin),
                _ref.generalized_lifted_structure_loss, embeddings, labels, ref_embeddings, ref_labels, reduction,
                backend, ref_self_index)


def tuplet_margin_loss(embeddings: Tensor, labels: Tensor, *, margin: float = TUPLET_DEFAULT_MARGIN,
                       scale: float = 64.0, ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                       reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Tuplet margin loss (Yu and Tao, ICCV 2019), as PML's TupletMarginLoss: for each positive
    pair, log(1 + sum_N exp(scale (s_n - cos(theta_p - margin)))) with theta_p = acos(s_p),
    "mean" over all positive pairs; 0 when the batch has no positive or no negative pair.
    margin: radians in [0, pi/2] (PML takes degrees; the default is its 5.73 degrees)."""
    return _run("tuplet_margin", _tuplet_params(margin, scale), _ref.tuplet_margin_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend, ref_self_index)


def fastap_loss(embeddings: Tensor, labels: Tensor, *, num_bins: int = 10, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                ref_self_index: int | None = None) -> Tensor:
    """FastAP (Cakir et al., CVPR 2019), as PML's FastAPLoss: the squared Euclidean distances of
    the normalized embeddings in num_bins + 1 triangular histogram bins over [0, 4], per anchor
    1 - its histogram approximation of average precision, "mean" over the anchors that have a
    positive. (PML takes no references; here they work as for every pairwise loss.)"""
    return _run("fastap", _fastap_params(num_bins), lambda e, y, nb, **kw: _ref.fastap_loss(e, y, int(nb), **kw),
                embeddings, labels, ref_embeddings, ref_labels, reduction, backend, ref_self_index)


def _margin_beta(beta, labels: Tensor, dtype, device):
    """(beta per anchor (B,), whether beta is a single number). beta: a number, a one-element
    tensor, or a (num_classes,) tensor indexed by the labels (PML's class-specific beta)."""
    B = labels.shape[0]
    if not torch.is_tensor(beta):
        value = _validate.number("beta", beta)
        return torch.full((B,), value, dtype=dtype, device=device), True
    _validate.tensor("beta", beta, floating=True)
    _validate.same_device(beta=beta, labels=labels)
    if beta.numel() == 1:
        return beta.reshape(1).to(dtype).expand(B), True
    if beta.dim() != 1:
        raise ValueError(f"beta must be a number, a one-element tensor or (num_classes,), got shape {tuple(beta.shape)}")
    C = beta.shape[0]
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"labels must be class indices in [0, {C}) to pick the class-specific beta "
                             f"(num_classes={C}), got labels in [{lo}, {hi}]")
    return beta.to(dtype)[labels.clamp(0, C - 1)], False


def margin_based_loss(embeddings: Tensor, labels: Tensor, *, margin: float = 0.2, beta=1.2, nu: float = 0.0,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None) -> Tensor:
    """Margin loss (Wu et al., ICCV 2017), as PML's MarginLoss with triplets_per_anchor="all":
    Euclidean distances of the normalized embeddings, over every triplet (a, p, n)
    relu(d_ap - beta + margin) + relu(beta - d_an + margin), summed and divided by the number of
    non-zero parts (PML's DivisorReducer); never forms the triplets (O(B M) per call, not B x P x N).
    beta: a number, a one-element tensor or a (num_classes,) tensor indexed by the anchors'
    labels; a tensor that requires grad is learned (its gradient flows). nu: weight of PML's beta
    regularizer (nu * beta; with class-specific beta, nu * beta_a per triplet divided like the
    loss); "none" returns the anchors' triplet sums without it."""
    margin = _validate.number("margin", margin)
    nu = _validate.number("nu", nu)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    compute = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
    beta_rows, single = _margin_beta(beta, labels, compute, embeddings.device)
    stats, loss = _stats("margin", (margin,), _ref.margin_based_loss, embeddings, labels, ref_embeddings, ref_labels,
                         reduction, backend, ref_self_index, row_params=beta_rows,
                         reference_kw=dict(beta=beta if single else beta_rows, nu=nu))
    if stats is None:
        return loss
    out = _ops.reduce(stats, _ops.LOSSES["margin"], reduction)
    if reduction != "none":
        det = stats.detach()
        triplets = det[:, PairStat.NUM_POS] * det[:, PairStat.NUM_NEG]
        out = out + _ref.margin_beta_regularizer(beta_rows.to(out.dtype), nu, triplets, det[:, PairStat.COUNT0].sum(),
                                                 single, reduction)
    return out.to(embeddings.dtype)


def npairs_loss(embeddings: Tensor, labels: Tensor, *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """N-pair loss (Sohn, NeurIPS 2016), as PML's NPairsLoss (default distance: cosine
    similarity): for each label with two or more samples (in increasing label order) its first
    sample is an anchor and its second the positive; cross-entropy of the K x K anchor-positive
    similarities with the diagonal as targets, "mean" over the K pairs. PML finds the pairs
    among all B x B pairs; here a sort finds them and the K x K similarities run on the fused
    linear kernels of the softmax family (never materialized). "none": (B,), each anchor's loss
    (0 for the other rows). The number of pairs depends on the labels: on CUDA it is read back
    to the host once (as PML does). backend: "auto" | "reference" | "cpu" | "triton"."""
    check_inputs(embeddings, labels, None, None)
    _validate.reduction(reduction)
    from ..softmax import _ops as _softmax_ops
    from ..softmax.encouraging import run_linear

    chosen = _registry.resolve(_softmax_ops.LINEAR_OP, backend, embeddings.device)
    if chosen == "reference":
        return _ref.npairs_loss(embeddings, labels, reduction=reduction)
    compute = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
    a, p = _ref.npairs_pairs(labels)
    K = a.shape[0]
    if K == 0:
        zero = embeddings.sum() * 0
        return zero.expand(embeddings.shape[0]).clone() if reduction == "none" else zero
    x = F.normalize(embeddings.to(compute), p=2, dim=1, eps=1e-12)
    params = _softmax_ops.make_params(0.75, 0.0, 0.0, 1e-5)
    target = torch.arange(K, device=labels.device)
    out = run_linear(chosen, x[a], x[p], None, target, None, -100, _softmax_ops.TRANSFORMS["identity"], params,
                     reduction)
    if reduction == "none":
        out = out.new_zeros(embeddings.shape[0]).index_put((a,), out)
    return out.to(embeddings.dtype)


for _fn in (circle_loss, unified_loss, multi_similarity_loss, supcon_loss, ntxent_loss, contrastive_loss,
            triplet_margin_loss, generalized_lifted_structure_loss,
            tuplet_margin_loss, fastap_loss, margin_based_loss):
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


class GeneralizedLiftedStructureLoss(PairwiseLoss):
    _function = generalized_lifted_structure_loss
    _options = ("neg_margin", "pos_margin", "reduction", "backend")

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__(neg_margin=neg_margin, pos_margin=pos_margin, reduction=reduction, backend=backend)

    def spec(self):
        return "generalized_lifted_structure", _gen_lifted_params(self.pos_margin, self.neg_margin)


class TupletMarginLoss(PairwiseLoss):
    """PML's TupletMarginLoss; margin in radians (PML: degrees), default PML's 5.73 degrees."""

    _function = tuplet_margin_loss
    _options = ("margin", "scale", "reduction", "backend")

    def __init__(self, margin: float = TUPLET_DEFAULT_MARGIN, scale: float = 64.0, reduction: str = "mean",
                 backend: str = "auto"):
        _tuplet_params(margin, scale)
        super().__init__(margin=margin, scale=scale, reduction=reduction, backend=backend)

    def spec(self):
        return "tuplet_margin", _tuplet_params(self.margin, self.scale)


class FastAPLoss(PairwiseLoss):
    _function = fastap_loss
    _options = ("num_bins", "reduction", "backend")

    def __init__(self, num_bins: int = 10, reduction: str = "mean", backend: str = "auto"):
        _fastap_params(num_bins)
        super().__init__(num_bins=num_bins, reduction=reduction, backend=backend)

    def spec(self):
        return "fastap", _fastap_params(self.num_bins)


class MarginLoss(PairwiseLoss):
    """PML's MarginLoss (triplets_per_anchor="all"). beta is a tensor (1,) or, with num_classes,
    (num_classes,): an nn.Parameter when learn_beta (then nu weights PML's beta regularizer),
    else a buffer that is not saved in the state_dict (as PML, where it is a plain attribute)."""

    _function = margin_based_loss
    _options = ("margin", "nu", "reduction", "backend")

    def __init__(self, margin: float = 0.2, nu: float = 0.0, beta: float = 1.2, triplets_per_anchor="all",
                 learn_beta: bool = False, num_classes: int | None = None, reduction: str = "mean",
                 backend: str = "auto"):
        if triplets_per_anchor != "all":
            raise ValueError(f"triplets_per_anchor must be 'all' (every triplet, PML's default); random triplet "
                             f"sampling is not supported, got {triplets_per_anchor!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        super().__init__(margin=margin, nu=nu, reduction=reduction, backend=backend)
        self.triplets_per_anchor = triplets_per_anchor
        self.learn_beta = bool(learn_beta)
        self.num_classes = num_classes
        b = torch.tensor([_validate.number("beta", beta)])
        if num_classes:
            b = torch.ones(num_classes) * b
        if self.learn_beta:
            self.beta = nn.Parameter(b)
        else:
            self.register_buffer("beta", b, persistent=False)

    def options(self) -> dict:
        opts = super().options()
        opts["beta"] = self.beta
        if not self.learn_beta:
            opts["nu"] = 0.0  # PML adds the regularizer only for a learned beta
        return opts

    def spec(self):
        raise NotImplementedError("MarginLoss has a beta per anchor; it runs on pairwise_loss_rowparam, which "
                                  "DistributedPairwiseLoss does not take")


class NPairsLoss(PairwiseLoss):
    """PML's NPairsLoss (cosine similarity); takes no references (as PML)."""

    _function = npairs_loss
    _options = ("reduction", "backend")

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__(reduction=reduction, backend=backend)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, ref_self_index=None):
        if ref_emb is not None or ref_labels is not None or ref_self_index is not None:
            raise ValueError("NPairsLoss takes no ref_emb / ref_labels (as pytorch-metric-learning's)")
        if indices_tuple is not None:
            raise NotImplementedError("NPairsLoss builds its own pairs; miners (indices_tuple) are not supported")
        return npairs_loss(embeddings, labels, **self.options())

    def spec(self):
        raise NotImplementedError("NPairsLoss runs on the fused linear softmax kernels, not the pairwise engine")

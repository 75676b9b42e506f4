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

from .. import _oplib, _registry, _validate
from .._ids import PairExtParam, PairGradMode, PairMiner, PairStat, PairValue
from .._module import LossModule
from . import _ops, _semantics
from . import distances as _distances
from . import miners as _miners
from . import reducers as _reducers
from . import reference as _ref
from . import regularizers as _regularizers
from . import tuples as _tuples


def check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index=None):
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    if labels is not None:
        _validate.tensor("labels", labels, ndim=1, integer=True)
        _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    if ref_embeddings is None and ref_labels is not None:
        raise ValueError("ref_labels needs ref_embeddings")
    if ref_embeddings is not None and labels is not None and ref_labels is None:
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        _validate.tensor("ref_embeddings", ref_embeddings, ndim=2, floating=True)
        if ref_labels is not None:
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


def _compute_dtype(embeddings):
    return torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype


def prepare(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, backend_name, normalize=True):
    """Operands for the ops: (x, labels64, ref, ref_labels64, self_offset, ref_is_x); rows
    L2-normalized unless the distance keeps them as they are."""
    low_precision = embeddings.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = _compute_dtype(embeddings)

    def rows(t):
        t = t.to(compute_dtype)
        # Contiguous: the Triton kernels read the rows with unit stride (transposed or sliced inputs).
        return (F.normalize(t, p=2, dim=1, eps=1e-12) if normalize else t).contiguous()

    x = rows(embeddings)
    labels64 = labels.to(torch.int64).contiguous()
    if ref_embeddings is None:
        ref, ref_lab64, self_offset, ref_is_x = x, labels64, 0, True
    else:
        ref = rows(ref_embeddings)
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
    if labels is None:
        raise ValueError("loss_terms needs labels")
    loss_id = _ops.LOSSES[loss_name]
    chosen = _ops.resolve(backend, embeddings, loss_id, ref_embeddings)
    if chosen == "reference":
        raise _registry.BackendUnavailable("loss_terms needs a compiled or Triton backend (the reference reduces densely)")
    x, lab, ref, ref_lab, self_offset, ref_is_x = prepare(embeddings, labels, ref_embeddings, ref_labels,
                                                          ref_self_index, chosen)
    stats = _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, params, PairGradMode.NONE)
    return _ops.row_terms(stats, loss_id).to(embeddings.dtype), stats.detach()


# ---------------------------------------------------------------- the one path of every pairwise loss

# pytorch-metric-learning's keywords, which every pairwise loss (function and Module) takes.
PML_OPTIONS = ("distance", "reducer", "embedding_regularizer", "embedding_reg_weight")
_DEFAULT_DISTANCES = {"cosine": _distances.CosineSimilarity, "dot": _distances.DotProductSimilarity,
                      "lp": _distances.LpDistance, "lp2": lambda: _distances.LpDistance(power=2)}
# One instance each (stateless; the losses only read them): an nn.Module built per call costs
# about as much as a small batch's loss.
_DEFAULTS = {k: make() for k, make in _DEFAULT_DISTANCES.items()}
_DEFAULT_SPECS = {k: d.spec() for k, d in _DEFAULTS.items()}


def _distance(sem: _semantics.Semantics, loss_name: str, distance) -> _distances.BaseDistance:
    dist = _distances.as_distance(distance)
    if dist is None:
        return _DEFAULTS[sem.default_distance]
    if sem.only_distances and type(dist).__name__ not in sem.only_distances:
        raise ValueError(f"the {loss_name} loss takes distance={' or '.join(sem.only_distances)} only (as "
                         f"pytorch-metric-learning asserts), got {type(dist).__name__}")
    for attr, value in sem.requires:
        if getattr(dist, attr) != value:
            raise ValueError(f"the {loss_name} loss takes a distance with {attr}={value!r} only (as "
                             f"pytorch-metric-learning asserts), got {dist!r}")
    return dist


def _engine_params(sem, params, dist: _distances.DistanceSpec, miner=None):
    """The op's params for this distance (and fused miner), and whether the rows are normalized.
    The losses are written in their own orientation (similarity or distance); a distance of the
    other one enters negated with the loss's threshold parameters negated (sem.flips), which is
    what PML's distance.margin() amounts to. The losses without the PairExtParam block (sem.ext)
    reach the engine with their default distance only."""
    if not sem.ext:
        return [float(v) for v in params], False
    if sem.similarity:
        value = PairValue.GEMM if dist.inverted else PairValue.NEG_DIST_POW
    elif dist.inverted:
        value = PairValue.NEG_GEMM
    else:
        value = PairValue.GEMM if dist.power == 1 else PairValue.DIST_POW
    flipped = sem.similarity != dist.inverted
    out = [-v if flipped and k in sem.flips else float(v) for k, v in enumerate(params)]
    uses_distance = value in (PairValue.DIST_POW, PairValue.NEG_DIST_POW) or (not sem.similarity
                                                                              and value == PairValue.GEMM)
    raw_norms = uses_distance and not dist.normalize
    miner_id, mp = (PairMiner.NONE, ()) if miner is None else miner
    if value != PairValue.GEMM or raw_norms or miner_id != PairMiner.NONE:
        ext = [0.0] * len(PairExtParam)
        ext[PairExtParam.VALUE], ext[PairExtParam.POWER] = float(value), float(dist.power)
        ext[PairExtParam.RAW_NORMS], ext[PairExtParam.MINER] = float(raw_norms), float(miner_id)
        for k, v in enumerate(mp):
            ext[PairExtParam.MINER0 + k] = float(v)
        out += ext
    return out, raw_norms


def _fast_reduction(red, sem, reduction):
    """The reduction= mode equal to this reducer on the engine's counts (where the forward's
    gradient applies), or None."""
    if red is None:
        return reduction
    if type(red) is _reducers.SumReducer:
        return "sum"
    if sem.default_reducer == "avg_non_zero":
        default = isinstance(red, _reducers.ThresholdReducer) and red.low == 0 and red.high is None
    else:
        default = type(red) is _reducers.DEFAULTS[sem.default_reducer]
    return "mean" if default else None


def _needs_elements(red, sem) -> str | None:
    """Why this reducer cannot reduce the engine's per-anchor sums (None: it can)."""
    if red is None:
        return None
    for name, kind, term, count, nonzero in sem.sub_losses:
        r = _reducers.for_sub_loss(red, name)
        if isinstance(r, _reducers.DoNothingReducer):
            return "DoNothingReducer returns every element's loss"
        if term is None or (kind != "element" and count is None):
            return f"a {type(r).__name__} on {name} needs every element's loss (the engine has no per-anchor form)"
        if kind != "element" and isinstance(r, _reducers.ThresholdReducer) and not (
                r.low == 0 and r.high is None and nonzero is not None):
            return f"a {type(r).__name__}({r.low}, {r.high}) on pair losses needs every pair's loss"
    return None


def _reduce(subs: dict, red, sem, reduction, embeddings, labels, B):
    """The loss from its sub-losses (Elements or engine Summaries), PML's way: each sub-loss by its
    reducer, then added; reduction= modes stand for the loss's default reducer ("mean"), a sum, or
    per-anchor sums ("none")."""
    if isinstance(red, _reducers.DoNothingReducer):
        return {name: {"losses": e.losses, "indices": e.indices, "reduction_type": e.reduction_type,
                       **({} if getattr(e, "divisor", None) is None else {"divisor": e.divisor})}
                for name, e in subs.items()}
    if red is None and reduction == "none":
        # Per anchor, the sum of its engine terms (MarginLoss's beta regularizer is none of them).
        terms = {sub[0] for sub in sem.sub_losses if sub[2] is not None}
        total = embeddings.new_zeros(B, dtype=_compute_dtype(embeddings))
        for name, e in subs.items():
            if name not in terms:
                continue
            if isinstance(e, _reducers.Summary):
                total = total + e.sums
            else:
                anchors = e.indices if e.reduction_type == "element" else e.indices[0]
                total = total.index_add(0, anchors, e.losses.to(total.dtype))
        return total
    if red is None:
        red = _reducers.SumReducer() if reduction == "sum" else _reducers.DEFAULTS[sem.default_reducer]()
    total = 0
    for name, e in subs.items():
        r = _reducers.for_sub_loss(red, name)
        if isinstance(e, _reducers.Summary):
            out = r.reduce_summary(e, embeddings, labels)
            assert out is not None, "_needs_elements lets only summary reducers through"
        else:
            out = r.reduce_elements(e, embeddings, labels)
            if torch.is_tensor(out) and out.dim() > 0:  # an already reduced (1,) (PML: MultipleReducers' entry)
                out = out.reshape(())
        total = total + out
    return total


def _nan_carrier(*tensors):
    """0, or NaN when an input is not finite: what listed or mined pairs leave out of the loss must
    still make a non-finite input give a non-finite loss."""
    return sum((t.sum() * 0).to(tensors[0].dtype) for t in tensors if t is not None)


def _finish(loss, embeddings, regularizer, reg_weight, red):
    """The loss in the dtype F.cross_entropy would return (float32 under autocast), plus the
    embedding regularizer's term."""
    dtype = _oplib.loss_dtype(embeddings)
    if regularizer is None:
        return loss if isinstance(loss, dict) else loss.to(dtype)
    reg = regularizer(embeddings) * reg_weight
    if isinstance(loss, dict):
        loss["embedding_reg_loss"] = {"losses": reg, "indices": None, "reduction_type": "already_reduced"}
        return loss
    return (loss + reg).to(dtype)


def _listed(loss_name, params, sem, embeddings, labels, ref_embeddings, ref_labels, t, dist, red, reduction,
            ref_self_index, given, options, aux=None):
    """The loss on listed pairs (tuples.py): the given indices_tuple, or all pairs. aux: the
    loss's inputs besides the tuple (tuples.element_losses)."""
    dtype = _compute_dtype(embeddings)
    B = embeddings.shape[0]
    M = B if ref_embeddings is None else ref_embeddings.shape[0]
    aux = dict(aux or {})
    if sem.tuples == "weights":  # FastAP: every pair, the tuple weights the anchors
        if given and ref_embeddings is not None:
            raise ValueError(f"{loss_name}: an indices_tuple weights the batch rows it lists, so it takes no "
                             f"references (pytorch-metric-learning's {sem.pml_class} takes none at all)")
        aux["weights"] = _tuples.anchor_weights(t if given else None, B, dtype, embeddings.device)
        t = None
    if sem.tuples == "unique_pos":
        aux["labels"] = labels
    if t is None:
        t = _tuples.all_pairs(labels, ref_labels if ref_embeddings is not None else None, ref_self_index, M)
        if sem.tuples == "triplets":
            t = _tuples.to_triplets(t)

    def rows(e):
        e = e.to(dtype)
        return F.normalize(e, p=dist.p, dim=1) if dist.normalize else e

    x = rows(embeddings)
    ref = x if ref_embeddings is None else rows(ref_embeddings)
    subs = None
    if not (given and _tuples.pml_zero_rule(t, loss_name)):
        subs = _tuples.element_losses(loss_name, params, x, ref, t, dist, aux=aux, **options)
    if subs is None:  # PML's zero loss
        zero = _reducers.zero_loss(embeddings)
        if isinstance(red, _reducers.DoNothingReducer):
            return {name: {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
                    for name, *_ in sem.sub_losses}
        return zero.expand(B) if (red is None and reduction == "none") else zero
    out = _reduce(subs, red, sem, reduction, embeddings, labels, B)
    if not isinstance(out, dict):
        out = out + _nan_carrier(embeddings, ref_embeddings)
    return out


def _keywords(loss_name, distance, reducer, embedding_regularizer, embedding_reg_weight, reduction):
    """PML's keywords checked: (semantics, distance, its spec, reducer or None)."""
    sem = _semantics.SEMANTICS[loss_name]
    dist = _distance(sem, loss_name, distance)
    red = _reducers.as_reducer(reducer)
    _regularizers.check(embedding_regularizer, embedding_reg_weight)
    _validate.reduction(reduction)
    if red is not None and reduction != "mean":
        raise ValueError(f"reducer= replaces reduction= (got reduction={reduction!r}); pass one of them")
    return sem, dist, dist.spec(), red


def _default_only(sem, loss_name, dist, spec) -> str | None:
    """Why the engine cannot compute this distance for a loss whose kernels know its default only."""
    if sem.ext or spec == _DEFAULT_SPECS[sem.default_distance]:
        return None
    return f"the {loss_name} kernels compute its default distance only, not {dist!r}"


def _run(loss_name, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
         ref_self_index=None, *, indices_tuple=None, distance=None, reducer=None, embedding_regularizer=None,
         embedding_reg_weight=1.0, options=None, aux=None, row_params=None, add_fast=None):
    """Every pairwise loss's one code path: PML's keywords, the fused engine, its fused miners and
    the pair-list path. `options`: the loss's PML options that only the pair lists compute
    (TripletMarginLoss's swap, smooth_loss), None or all false for the engine. `aux`: what the pair
    lists need besides the tuple (tuples.element_losses); `row_params` (B,): the op's per-anchor
    parameters; `add_fast(row_stats, reduction)`: a term added to the engine's "mean" or "sum"
    (MarginLoss's beta: its regularizer)."""
    sem, dist, spec, red = _keywords(loss_name, distance, reducer, embedding_regularizer, embedding_reg_weight,
                                     reduction)
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None (as in pytorch-metric-learning); for two "
                         "augmented views of a batch use SelfSupervisedLoss(loss)(view1, view2)")
    check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    options = {k: v for k, v in (options or {}).items() if v}
    B = embeddings.shape[0]
    M = B if ref_embeddings is None else ref_embeddings.shape[0]

    def listed(t, given):
        out = _listed(loss_name, params, sem, embeddings, labels, ref_embeddings, ref_labels, t, spec, red,
                      reduction, ref_self_index, given, options, aux)
        return _finish(out, embeddings, embedding_regularizer, embedding_reg_weight, red)

    engine_name, miner, mined = loss_name, None, None
    if isinstance(indices_tuple, _miners.MinedTuple):
        fused = _fused_miner(indices_tuple, loss_name, spec, embeddings, labels, ref_embeddings, ref_labels,
                             ref_self_index, options, red, backend)
        if fused is None:
            indices_tuple = indices_tuple.value()
        else:
            engine_name, miner = fused[0], fused[1:]
            mined = indices_tuple
    if indices_tuple is not None and mined is None:
        t = _tuples.check_indices_tuple(indices_tuple, B, M, embeddings.device)
        if loss_name == "triplet_hard":
            raise ValueError("triplet_margin_loss: mining='batch_hard' mines its own triplets; pass an "
                             "indices_tuple with mining='all' (PML's TripletMarginLoss)")
        return listed(t, given=True)
    if labels is None:
        raise ValueError("labels are needed unless indices_tuple is given")
    loss_id = _ops.LOSSES[engine_name]
    fast = _fast_reduction(red, sem, reduction)
    listed_why = None
    if not spec.engine:
        listed_why = f"the engine computes dot-product similarities and p = 2 distances, not {dist!r}"
    elif options:
        listed_why = f"{', '.join(options)} compare pairs across anchors"
    else:
        listed_why = _default_only(sem, loss_name, dist, spec) or (None if fast else _needs_elements(red, sem))
    op_params, raw_norms = _engine_params(sem, params, spec, miner)
    extended = len(op_params) > len(params)
    chosen = _ops.resolve(backend, embeddings, loss_id, ref_embeddings, extended=extended, miner=miner is not None,
                          listed=listed_why)
    dtype = _oplib.loss_dtype(embeddings)
    if chosen == "reference":
        plain = red is None and embedding_regularizer is None and not extended and listed_why is None
        if plain:
            emb, ref_emb = _oplib.loss_inputs(embeddings, ref_embeddings)  # (float32 under autocast)
            with _oplib.autocast_off(embeddings.device):
                return reference_fn(emb, labels, *params, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                    reduction=reduction, ref_self_index=ref_self_index).to(dtype)
        return listed(None if mined is None else mined.value(), given=mined is not None)
    x, lab, ref, ref_lab, self_offset, ref_is_x = prepare(embeddings, labels, ref_embeddings, ref_labels,
                                                          ref_self_index, chosen, normalize=spec.normalize)
    grad_mode = PairGradMode.NONE
    # The compiled kernels form the gradient in the forward pass (mean/sum weight every anchor of
    # a term alike): on CPU for every loss (contrastive's two terms split by sign), with CUDA for
    # one-term losses. Triton recomputes it in the backward, flash-attention style.
    fused_grad = chosen == "cpu" or (chosen == "cuda" and _ops.terms(loss_id) == 1)
    if fast in ("mean", "sum") and fused_grad and not raw_norms and torch.is_grad_enabled():
        if embeddings.requires_grad:
            grad_mode = PairGradMode.X
        if ref_embeddings is not None and ref_embeddings.requires_grad:
            grad_mode = PairGradMode.X_REF
    if row_params is not None:
        row_params = row_params.to(x.dtype)
    stats = _ops.run(chosen, x, lab, ref, ref_lab, self_offset, ref_is_x, loss_id, op_params, grad_mode, row_params)
    if fast is not None:
        out = _ops.reduce(stats, loss_id, fast)
        if add_fast is not None and fast != "none":
            out = out + add_fast(stats.detach(), fast).to(out.dtype)
    else:
        terms = _ops.row_terms(stats, loss_id)
        st = stats.detach()
        subs = {}
        for name, kind, k, count, nonzero in _semantics.SEMANTICS[engine_name].sub_losses:
            if kind == "element" and count is not None:  # the anchors that count (FastAP: with a positive)
                rows = (_semantics.ENGINE_COUNTS[count](st) > 0).nonzero().flatten()
                subs[name] = _reducers.Elements(terms[rows, k], rows, kind)
            elif kind == "element":
                subs[name] = _reducers.Elements(terms[:, k], torch.arange(B, device=x.device), kind)
            else:
                subs[name] = _reducers.Summary(terms[:, k], _semantics.ENGINE_COUNTS[count](st),
                                               None if nonzero is None else _semantics.ENGINE_COUNTS[nonzero](st),
                                               kind)
        out = _reduce(subs, red, sem, reduction, embeddings, labels, B)
        if not isinstance(out, dict):
            out = out * _ops.gate(_ops.totals(stats, loss_id), loss_id, out.dtype)
    if mined is not None and not isinstance(out, dict):
        if sem.tuples != "triplets":  # PML's pair losses: 0 when every mined list has at most one pair
            tot = _ops.totals(stats, loss_id)
            T = _ops.terms(loss_id)
            out = out * ((tot[T] > 1) | (tot[T + 1] > 1)).to(out.dtype)
        out = out + _nan_carrier(embeddings, ref_embeddings)
    if not isinstance(out, dict):
        # Non-finite embeddings give NaN even when the labels leave no term to carry it.
        out = _ref.nan_unless_finite(out, embeddings, ref_embeddings)
    return _finish(out, embeddings, embedding_regularizer, embedding_reg_weight, red)


def _fused_miner(mt, loss_name, spec, embeddings, labels, ref_embeddings, ref_labels, ref_self_index, options, red,
                 backend):
    """(engine loss, PairMiner, parameters) when the miner's rule can run inside this loss's pass
    on the CPU engine, else None (the tuple is then listed)."""
    fused = mt.miner.fused(loss_name)
    if fused is None or options or mt.miner.distance.spec() != spec or not spec.engine:
        return None
    same = (mt.embeddings is embeddings and mt.labels is labels and mt.ref_emb is ref_embeddings
            and mt.ref_labels is (ref_labels if ref_embeddings is not None else None))
    if not same or mt.self_index != ref_self_index or _needs_elements(red, _semantics.SEMANTICS[fused[0]]) \
            or embeddings.device.type != "cpu":
        return None
    if backend not in ("auto", "cpu") or _ext_forced_aten():
        return None
    return fused


def _ext_forced_aten() -> bool:
    import os

    return os.environ.get("STRUCTLOSS_FAST_PAIRWISE_EPILOGUE", "") == "aten"


_COMMON_DOC = """
    Common arguments:
        embeddings: (B, D), float16/bfloat16/float32/float64, any strides.
        labels: (B,) integer class labels (any integer dtype); may be None with an indices_tuple.
        ref_embeddings, ref_labels: optional (M, D) / (M,) references (e.g. a memory queue); they
            receive gradient if they require it.
        reduction: "mean" (the PML default reducer's average) | "sum" | "none" (per anchor).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".
        ref_self_index: with references, anchor i is reference (ref_self_index + i) mod M (the pair
            is excluded from the positives), as for a batch just written into a memory queue.
    pytorch-metric-learning's keywords (docs/pairwise.md, "PML keywords"):
        indices_tuple: a miner's (a1, p, a2, n) pairs or (a, p, n) triplets; the loss is computed on
            them only (O(pairs x D)); a structloss_fast miner's result fuses into the loss's pass.
        distance: CosineSimilarity(), DotProductSimilarity(...), LpDistance(...) or PML's objects;
            the loss's PML default when None.
        reducer: MeanReducer(), SumReducer(), AvgNonZeroReducer(), ThresholdReducer(low, high),
            PerAnchorReducer(...), ClassWeightedReducer(weights), DivisorReducer(),
            DoNothingReducer(), MultipleReducers(...) or PML's objects; replaces reduction=.
        embedding_regularizer, embedding_reg_weight: adds weight * regularizer(embeddings)
            (e.g. LpRegularizer()).
"""


def _check_pml(kw):
    unknown = set(kw) - set(PML_OPTIONS) - {"indices_tuple"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    return kw


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


def circle_loss(embeddings: Tensor, labels: Tensor | None, *, m: float = 0.4, gamma: float = 80.0,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """Circle loss with pair-level labels (Sun et al., CVPR 2020), as PML's CircleLoss: cosine
    similarities, alphas detached, rows without a positive or a negative give 0, "mean"
    averages the non-zero row losses. m: relaxation margin in [0, 1); gamma: scale > 0."""
    return _run("circle", _circle_params(m, gamma), _ref.circle_loss, embeddings, labels, ref_embeddings, ref_labels,
                reduction, backend, ref_self_index, **_check_pml(pml))


def unified_loss(embeddings: Tensor, labels: Tensor | None, *, m: float = 0.35, gamma: float = 64.0,
                 ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                 backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """The Circle paper's unified loss (Eq. 1), pair-level:
    softplus(LSE_N gamma (s_n + m) + LSE_P (-gamma s_p)); same reduction as circle_loss.
    Its class-level form is AM-Softmax/CosFace, whose defaults (m = 0.35, gamma = 64) it takes."""
    return _run("unified", _circle_params(m, gamma), _ref.unified_loss, embeddings, labels, ref_embeddings, ref_labels,
                reduction, backend, ref_self_index, **_check_pml(pml))


def multi_similarity_loss(embeddings: Tensor, labels: Tensor | None, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                          reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None,
                          **pml) -> Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019), as PML's MultiSimilarityLoss:
    (1/alpha) log(1 + sum_P e^{-alpha (s - base)}) + (1/beta) log(1 + sum_N e^{beta (s - base)}),
    "mean" over all anchors. alpha, beta > 0. With MultiSimilarityMiner's tuple, PML's mined loss."""
    return _run("multi_similarity", _ms_params(alpha, beta, base), _ref.multi_similarity_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def supcon_loss(embeddings: Tensor, labels: Tensor | None, *, temperature: float = 0.1,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), as PML's SupConLoss:
    -(1/|P|) sum_P [s_p/t - LSE_{P u N} s/t] per anchor, "mean" over the non-zero anchor losses;
    0 when the batch has no positive or no negative pair. temperature > 0."""
    return _run("supcon", _temperature_params(temperature), _ref.supcon_loss, embeddings, labels, ref_embeddings,
                ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def ntxent_loss(embeddings: Tensor, labels: Tensor | None, *, temperature: float = 0.07,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """NT-Xent / InfoNCE (Chen et al. 2020) with label-defined positives, as PML's NTXentLoss:
    for every positive pair, -log(e^{s_p/t} / (e^{s_p/t} + sum_N e^{s_n/t})), "mean" over all
    positive pairs. O(B) state per anchor (PML builds a positives x negatives tensor). For two
    augmented views without labels: SelfSupervisedLoss(NTXentLoss())(view1, view2)."""
    return _run("ntxent", _temperature_params(temperature), _ref.ntxent_loss, embeddings, labels, ref_embeddings,
                ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def contrastive_loss(embeddings: Tensor, labels: Tensor | None, *, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                     backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006), as PML's ContrastiveLoss: Euclidean distances of the
    normalized embeddings, relu(d - pos_margin) for positive pairs and relu(neg_margin - d) for
    negative pairs, each averaged over its non-zero pair losses, then added."""
    return _run("contrastive", _contrastive_params(pos_margin, neg_margin), _ref.contrastive_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def triplet_margin_loss(embeddings: Tensor, labels: Tensor | None, *, margin: float = 0.05, mining: str = "all",
                        swap: bool = False, smooth_loss: bool = False, triplets_per_anchor="all",
                        ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                        reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None,
                        **pml) -> Tensor:
    """Triplet margin loss, as PML's TripletMarginLoss: Euclidean distances of the normalized
    embeddings, relu(d_ap - d_an + margin), "mean" over the non-zero triplet losses.
    mining="all": every (anchor, positive, negative) triplet (PML's default; here in O(M log M)
    per anchor, never materialized); "batch_hard": each anchor's hardest positive and hardest
    negative (PML's BatchHardMiner). swap (the positive-negative distance where it violates the
    margin more) and smooth_loss (softplus for relu) as PML's, on listed triplets."""
    name, params = _triplet_spec(margin, mining)
    if triplets_per_anchor != "all":
        raise NotImplementedError("triplets_per_anchor other than 'all' (PML's random triplets) is not supported; "
                                  "pass a miner's indices_tuple instead")

    def reference(*args, **kw):
        return _ref.triplet_margin_loss(*args, mining=mining, **kw)

    return _run(name, params, reference, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
                ref_self_index, options=dict(swap=bool(swap), smooth_loss=bool(smooth_loss)), **_check_pml(pml))


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


def generalized_lifted_structure_loss(embeddings: Tensor, labels: Tensor | None, *, neg_margin: float = 1.0,
                                      pos_margin: float = 0.0, ref_embeddings: Tensor | None = None,
                                      ref_labels: Tensor | None = None, reduction: str = "mean",
                                      backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """Generalized lifted structure loss (Hermans et al. 2017), as PML's
    GeneralizedLiftedStructureLoss: Euclidean distances of the normalized embeddings,
    relu(LSE_P (d - pos_margin) + LSE_N (neg_margin - d)) per anchor (an empty set's LSE is 0),
    "mean" over all anchors."""
    return _run("generalized_lifted_structure", _gen_lifted_params(pos_margin, neg_margin),
                _ref.generalized_lifted_structure_loss, embeddings, labels, ref_embeddings, ref_labels, reduction,
                backend, ref_self_index, **_check_pml(pml))


def tuplet_margin_loss(embeddings: Tensor, labels: Tensor | None, *, margin: float = TUPLET_DEFAULT_MARGIN,
                       scale: float = 64.0, ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                       reduction: str = "mean", backend: str = "auto", ref_self_index: int | None = None,
                       **pml) -> Tensor:
    """Tuplet margin loss (Yu and Tao, ICCV 2019), as PML's TupletMarginLoss: for each positive
    pair, log(1 + sum_N exp(scale (s_n - cos(theta_p - margin)))) with theta_p = acos(s_p),
    "mean" over all positive pairs; 0 when the batch has no positive or no negative pair.
    margin: radians in [0, pi/2] (PML takes degrees; the default is its 5.73 degrees)."""
    return _run("tuplet_margin", _tuplet_params(margin, scale), _ref.tuplet_margin_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def fastap_loss(embeddings: Tensor, labels: Tensor, *, num_bins: int = 10, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                ref_self_index: int | None = None, **pml) -> Tensor:
    """FastAP (Cakir et al., CVPR 2019), as PML's FastAPLoss: the squared Euclidean distances of
    the normalized embeddings in num_bins + 1 triangular histogram bins over [0, 4], per anchor
    1 - its histogram approximation of average precision, "mean" over the anchors that have a
    positive. An indices_tuple weights the anchors by their number of appearances in it (PML's
    convert_to_weights); every pair is still used. distance: LpDistance(p=2) of normalized
    embeddings, any power (the bins span [0, 2^power]). (PML takes no references; here they work
    as for every pairwise loss, without an indices_tuple.)"""
    if labels is None:
        raise ValueError("fastap_loss: labels are needed, also with an indices_tuple (as PML's FastAPLoss)")
    return _run("fastap", _fastap_params(num_bins), lambda e, y, nb, **kw: _ref.fastap_loss(e, y, int(nb), **kw),
                embeddings, labels, ref_embeddings, ref_labels, reduction, backend, ref_self_index, **_check_pml(pml))


def _margin_beta(beta, labels: Tensor | None, dtype, device, B: int):
    """(beta per anchor (B,), whether beta is a single number). beta: a number, a one-element
    tensor, or a (num_classes,) tensor indexed by the labels (PML's class-specific beta)."""
    if labels is not None:
        _validate.tensor("labels", labels, ndim=1, integer=True)
    if not torch.is_tensor(beta):
        value = _validate.number("beta", beta)
        return torch.full((B,), value, dtype=dtype, device=device), True
    _validate.tensor("beta", beta, floating=True)
    _validate.same_device(beta=beta, labels=labels)
    if beta.numel() == 1:
        return beta.reshape(1).to(dtype).expand(B), True
    if beta.dim() != 1:
        raise ValueError(f"beta must be a number, a one-element tensor or (num_classes,), got shape {tuple(beta.shape)}")
    if labels is None:
        raise ValueError("margin_based_loss: a class-specific beta needs the labels (also with an indices_tuple)")
    C = beta.shape[0]
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"labels must be class indices in [0, {C}) to pick the class-specific beta "
                             f"(num_classes={C}), got labels in [{lo}, {hi}]")
    return beta.to(dtype)[labels.clamp(0, C - 1)], False


def margin_based_loss(embeddings: Tensor, labels: Tensor | None, *, margin: float = 0.2, beta=1.2, nu: float = 0.0,
                      ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None, reduction: str = "mean",
                      backend: str = "auto", ref_self_index: int | None = None, **pml) -> Tensor:
    """Margin loss (Wu et al., ICCV 2017), as PML's MarginLoss with triplets_per_anchor="all":
    Euclidean distances of the normalized embeddings, over every triplet (a, p, n)
    relu(d_ap - beta + margin) + relu(beta - d_an + margin), summed and divided by the number of
    non-zero parts (PML's DivisorReducer); never forms the triplets (O(B M) per call, not B x P x N).
    beta: a number, a one-element tensor or a (num_classes,) tensor indexed by the anchors'
    labels; a tensor that requires grad is learned (its gradient flows). nu: weight of PML's beta
    regularizer (nu * beta; with class-specific beta, nu * beta_a per triplet divided like the
    loss); "none" returns the anchors' triplet sums without it. With an indices_tuple, another
    distance or a reducer other than DivisorReducer / SumReducer, the triplets are listed (PML's
    sub-losses margin_loss and beta_reg_loss, each reduced by the reducer)."""
    margin = _validate.number("margin", margin)
    nu = _validate.number("nu", nu)
    compute = _compute_dtype(embeddings)
    beta_rows, single = _margin_beta(beta, labels, compute, embeddings.device, embeddings.shape[0])
    learned = nu != 0 or (torch.is_tensor(beta) and beta.requires_grad)

    def reference(*args, **kw):
        return _ref.margin_based_loss(*args, beta=beta if single else beta_rows, nu=nu, **kw)

    def regularizer(stats, reduction):
        triplets = stats[:, PairStat.NUM_POS] * stats[:, PairStat.NUM_NEG]
        return _ref.margin_beta_regularizer(beta_rows.to(stats.dtype), nu, triplets, stats[:, PairStat.COUNT0].sum(),
                                            single, reduction)

    return _run("margin", (margin,), reference, embeddings, labels, ref_embeddings, ref_labels, reduction, backend,
                ref_self_index, row_params=beta_rows, add_fast=regularizer,
                aux=dict(beta_rows=beta_rows, nu=nu, learned=learned, single=single), **_check_pml(pml))


def npairs_loss(embeddings: Tensor, labels: Tensor, *, reduction: str = "mean", backend: str = "auto",
                indices_tuple=None, distance=None, reducer=None, embedding_regularizer=None,
                embedding_reg_weight: float = 1.0) -> Tensor:
    """N-pair loss (Sohn, NeurIPS 2016), as PML's NPairsLoss (default distance:
    DotProductSimilarity() of normalized embeddings, i.e. cosine similarity): for each label with
    two or more samples (in increasing label order) its first sample is an anchor and its second
    the positive; cross-entropy of the K x K anchor-positive similarities with the diagonal as
    targets, "mean" over the K pairs. PML finds the pairs among all B x B pairs; here a sort finds
    them and the K x K similarities run on the fused linear kernels of the softmax family (never
    materialized). "none": (B,), each anchor's loss (0 for the other rows). The number of pairs
    depends on the labels: on CUDA it is read back to the host once (as PML does).
    backend: "auto" | "reference" | "cpu" | "triton". PML's keywords as every pairwise loss
    (docs/pairwise.md): with an indices_tuple, the first positive pair of each anchor label in it;
    another distance or a reducer that needs every pair's loss computes the K x K matrix in plain
    PyTorch. No references (as PML)."""
    sem, dist, spec, red = _keywords("npairs", distance, reducer, embedding_regularizer, embedding_reg_weight,
                                     reduction)
    if labels is None:
        raise ValueError("npairs_loss: labels are needed, also with an indices_tuple (as PML's NPairsLoss)")
    check_inputs(embeddings, labels, None, None)
    fast = _fast_reduction(red, sem, reduction)
    why = _default_only(sem, "npairs", dist, spec)
    if why is None and fast is None:
        why = f"a {type(red).__name__} needs every pair's loss"
    if indices_tuple is not None or why is not None:  # the K x K matrix in plain PyTorch (tuples.py)
        if indices_tuple is None and backend not in ("auto", "reference"):
            raise _registry.BackendUnavailable(f"backend={backend!r} cannot run npairs_loss here: {why}")
        B = embeddings.shape[0]
        t = None if indices_tuple is None else _tuples.check_indices_tuple(indices_tuple, B, B, embeddings.device)
        out = _listed("npairs", (), sem, embeddings, labels, None, None, t, spec, red, reduction, None,
                      t is not None, {})
        return _finish(out, embeddings, embedding_regularizer, embedding_reg_weight, red)
    from ..softmax import _ops as _softmax_ops
    from ..softmax.encouraging import run_linear

    chosen = _registry.resolve(_softmax_ops.LINEAR_OP, backend, embeddings.device)
    if chosen == "reference":
        out = _ref.npairs_loss(embeddings, labels, reduction=fast)
        return _finish(_ref.nan_unless_finite(out, embeddings), embeddings, embedding_regularizer,
                       embedding_reg_weight, red)
    a, p = _ref.npairs_pairs(labels)
    K = a.shape[0]
    compiling = torch.compiler.is_compiling()  # (K is data-dependent: no Python branch on it there)
    if not compiling and K == 0:
        zero = embeddings.sum() * 0
        out = zero.expand(embeddings.shape[0]).clone() if fast == "none" else zero
        return _finish(out, embeddings, embedding_regularizer, embedding_reg_weight, red)
    x = F.normalize(embeddings.to(_compute_dtype(embeddings)), p=2, dim=1, eps=1e-12)
    params = _softmax_ops.make_params(0.75, 0.0, 0.0, 1e-5)
    target = torch.arange(K, device=labels.device)
    out = run_linear(chosen, x[a], x[p], None, target, None, -100, _softmax_ops.TRANSFORMS["identity"], params, fast)
    if fast == "none":
        out = out.new_zeros(embeddings.shape[0]).index_put((a,), out)
    elif compiling:  # PML's 0 without pairs (the mean over no rows would be NaN)
        out = torch.where(torch.ones_like(a).sum() > 0, out, torch.zeros_like(out))
    # Non-finite embeddings give NaN even when no pair reads the poisoned row.
    return _finish(_ref.nan_unless_finite(out, embeddings), embeddings, embedding_regularizer,
                   embedding_reg_weight, red)


for _fn in (circle_loss, unified_loss, multi_similarity_loss, supcon_loss, ntxent_loss, contrastive_loss,
            triplet_margin_loss, generalized_lifted_structure_loss,
            tuplet_margin_loss, fastap_loss, margin_based_loss):
    _fn.__doc__ += _COMMON_DOC


class PairwiseLoss(LossModule):
    """The Module form of a pairwise loss, called as loss_fn(embeddings, labels, indices_tuple,
    ref_emb, ref_labels) like pytorch-metric-learning's losses (ref_self_index as its
    CrossBatchMemory passes them). Every subclass takes PML's distance=, reducer=,
    embedding_regularizer= and embedding_reg_weight= (added to its _options here)."""

    _pml_defaults = dict(distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1.0)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls._options and not set(PML_OPTIONS) <= set(cls._options):
            cls._options = tuple(cls._options) + PML_OPTIONS

    def __init__(self, **options):
        super().__init__(**{**self._pml_defaults, **options})

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, ref_self_index=None):
        return type(self)._function(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                    ref_self_index=ref_self_index, indices_tuple=indices_tuple, **self.options())

    def spec(self) -> tuple[str, tuple]:
        """(engine loss name, validated parameters): what DistributedPairwiseLoss and
        CrossBatchMemory need to run this loss on other references."""
        raise NotImplementedError


class CircleLoss(PairwiseLoss):
    _function = circle_loss
    _options = ("m", "gamma", "reduction", "backend")

    def __init__(self, m: float = 0.4, gamma: float = 80.0, reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(m=m, gamma=gamma, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "circle", _circle_params(self.m, self.gamma)


class UnifiedLoss(PairwiseLoss):
    _function = unified_loss
    _options = ("m", "gamma", "reduction", "backend")

    def __init__(self, m: float = 0.35, gamma: float = 64.0, reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(m=m, gamma=gamma, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "unified", _circle_params(self.m, self.gamma)


class MultiSimilarityLoss(PairwiseLoss):
    _function = multi_similarity_loss
    _options = ("alpha", "beta", "base", "reduction", "backend")

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, reduction: str = "mean",
                 backend: str = "auto", **pml):
        super().__init__(alpha=alpha, beta=beta, base=base, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "multi_similarity", _ms_params(self.alpha, self.beta, self.base)


class SupConLoss(PairwiseLoss):
    _function = supcon_loss
    _options = ("temperature", "reduction", "backend")

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(temperature=temperature, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "supcon", _temperature_params(self.temperature)


class NTXentLoss(PairwiseLoss):
    _function = ntxent_loss
    _options = ("temperature", "reduction", "backend")

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(temperature=temperature, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "ntxent", _temperature_params(self.temperature)


class ContrastiveLoss(PairwiseLoss):
    _function = contrastive_loss
    _options = ("pos_margin", "neg_margin", "reduction", "backend")

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, reduction: str = "mean",
                 backend: str = "auto", **pml):
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "contrastive", _contrastive_params(self.pos_margin, self.neg_margin)


class TripletMarginLoss(PairwiseLoss):
    _function = triplet_margin_loss
    _options = ("margin", "mining", "swap", "smooth_loss", "triplets_per_anchor", "reduction", "backend")

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                 triplets_per_anchor="all", mining: str = "all", reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(margin=margin, mining=mining, swap=swap, smooth_loss=smooth_loss,
                         triplets_per_anchor=triplets_per_anchor, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return _triplet_spec(self.margin, self.mining)


# PML's `losses` module also holds its wrappers and class-level heads: with these names here,
# `from structloss_fast.pairwise import losses, miners, distances, reducers, regularizers`
# stands in for `from pytorch_metric_learning import ...` (imported on first use: they import
# this module).
_ELSEWHERE = {"CrossBatchMemory": "structloss_fast.pairwise.cross_batch_memory",
              "SelfSupervisedLoss": "structloss_fast.pairwise.self_supervised",
              "ArcFaceLoss": "structloss_fast.softmax.margin_heads", "CosFaceLoss": "structloss_fast.softmax.margin_heads"}


def __getattr__(name):
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class GeneralizedLiftedStructureLoss(PairwiseLoss):
    _function = generalized_lifted_structure_loss
    _options = ("neg_margin", "pos_margin", "reduction", "backend")

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", **pml):
        super().__init__(neg_margin=neg_margin, pos_margin=pos_margin, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "generalized_lifted_structure", _gen_lifted_params(self.pos_margin, self.neg_margin)


class TupletMarginLoss(PairwiseLoss):
    """PML's TupletMarginLoss; margin in radians (PML: degrees), default PML's 5.73 degrees."""

    _function = tuplet_margin_loss
    _options = ("margin", "scale", "reduction", "backend")

    def __init__(self, margin: float = TUPLET_DEFAULT_MARGIN, scale: float = 64.0, reduction: str = "mean",
                 backend: str = "auto", **pml):
        _tuplet_params(margin, scale)
        super().__init__(margin=margin, scale=scale, reduction=reduction, backend=backend, **pml)

    def spec(self):
        return "tuplet_margin", _tuplet_params(self.margin, self.scale)


class FastAPLoss(PairwiseLoss):
    _function = fastap_loss
    _options = ("num_bins", "reduction", "backend")

    def __init__(self, num_bins: int = 10, reduction: str = "mean", backend: str = "auto", **pml):
        _fastap_params(num_bins)
        super().__init__(num_bins=num_bins, reduction=reduction, backend=backend, **pml)

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
                 backend: str = "auto", **pml):
        if triplets_per_anchor != "all":
            raise ValueError(f"triplets_per_anchor must be 'all' (every triplet, PML's default); random triplet "
                             f"sampling is not supported, got {triplets_per_anchor!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        super().__init__(margin=margin, nu=nu, reduction=reduction, backend=backend, **pml)
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
    """PML's NPairsLoss (DotProductSimilarity of normalized embeddings); takes no references (as PML)."""

    _function = npairs_loss
    _options = ("reduction", "backend")

    def __init__(self, reduction: str = "mean", backend: str = "auto", **pml):
        super().__init__(reduction=reduction, backend=backend, **pml)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, ref_self_index=None):
        if ref_emb is not None or ref_labels is not None or ref_self_index is not None:
            raise ValueError("NPairsLoss takes no ref_emb / ref_labels (as pytorch-metric-learning's)")
        return npairs_loss(embeddings, labels, indices_tuple=indices_tuple, **self.options())

    def spec(self):
        raise NotImplementedError("NPairsLoss runs on the fused linear softmax kernels, not the pairwise engine")

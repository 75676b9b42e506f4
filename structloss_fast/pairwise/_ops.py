"""Op glue of the pairwise engine: the op's registration (fake kernels, autograd, Triton twin),
its backends, and the one reduction of its row statistics.

structloss_fast::pairwise_loss (CPU and CUDA kernels in csrc/, the Triton twin in _triton.py)
takes L2-normalized embeddings and returns per-anchor statistics (PairStat columns, ids.h);
`reduce` below turns them into the loss for every backend alike, and autograd hands the op's
backward the gradient of each anchor's terms ("row weights") as the gradient of those columns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _oplib, _registry
from .._ids import (PAIR_LOSS_INFO, PAIR_LOSSES_WITH_ROW_PARAMS, PAIR_TERM_COUNT, PAIR_TERM_SUM, PairGradMode,
                    PairLoss, PairStat)

OP = "pairwise_loss"
# The same engine with a parameter per anchor (MarginLoss's beta), CPU kernel only.
ROWPARAM_OP = "pairwise_loss_rowparam"
NUM_STATS = len(PairStat)

# Public loss names (the `loss_name` of loss_terms and of the modules' spec()) -> engine ids.
LOSSES = {
    "circle": PairLoss.CIRCLE,
    "unified": PairLoss.UNIFIED,
    "multi_similarity": PairLoss.MULTI_SIMILARITY,
    "supcon": PairLoss.SUP_CON,
    "ntxent": PairLoss.NT_XENT,
    "contrastive": PairLoss.CONTRASTIVE,
    "triplet_all": PairLoss.TRIPLET_ALL,
    "triplet_hard": PairLoss.TRIPLET_HARD,
    "generalized_lifted_structure": PairLoss.GEN_LIFTED,
    "tuplet_margin": PairLoss.TUPLET_MARGIN,
    "margin": PairLoss.MARGIN_ALL,
    "fastap": PairLoss.FAST_AP,
}


def terms(loss: int) -> int:
    return PAIR_LOSS_INFO[loss].terms


def stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels


def _fake_forward(x, labels, ref, ref_labels, self_offset, ref_is_x, loss, params, grad_mode):
    torch._check(x.dim() == 2 and ref.dim() == 2, lambda: "x and ref must be 2-D")
    torch._check(x.shape[1] == ref.shape[1], lambda: "x and ref differ in embedding size")
    torch._check(labels.shape == (x.shape[0],), lambda: "labels must be (B,)")
    torch._check(ref_labels.shape == (ref.shape[0],), lambda: "ref_labels must be (M,)")
    B, D = x.shape
    M = ref.shape[0]
    T = terms(loss) if grad_mode != PairGradMode.NONE else 0
    dt = stat_dtype(x)
    row_stats = x.new_empty((B, NUM_STATS), dtype=dt)
    grad_x = x.new_empty((T, B, D), dtype=dt)
    grad_ref = x.new_empty((T if grad_mode == PairGradMode.X_REF and not ref_is_x else 0, M, D), dtype=dt)
    return row_stats, grad_x, grad_ref


def _fake_forward_rowparam(x, labels, ref, ref_labels, row_params, *rest):
    torch._check(row_params.shape == (x.shape[0],), lambda: "row_params must be (B,)")
    return _fake_forward(x, labels, ref, ref_labels, *rest)


def _fake_backward_rowparam(x, labels, ref, ref_labels, row_params, *rest):
    return _fake_backward(x, labels, ref, ref_labels, *rest)


def _fake_backward(x, labels, ref, ref_labels, row_stats, row_weights, self_offset, ref_is_x, loss, params, ref_grad):
    torch._check(row_stats.shape == (x.shape[0], NUM_STATS), lambda: f"row_stats must be (B, {NUM_STATS})")
    torch._check(row_weights.shape == (x.shape[0], terms(loss)), lambda: "row_weights must be (B, terms)")
    dt = stat_dtype(x)
    return (x.new_empty(x.shape, dtype=dt),
            x.new_empty((ref.shape[0] if ref_grad and not ref_is_x else 0, x.shape[1]), dtype=dt))


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    # pairwise_loss_rowparam has row_params (B,) after ref_labels; pairwise_loss has none.
    x, labels, ref, ref_labels, *row_params, self_offset, ref_is_x, loss, params, grad_mode = inputs
    row_stats, grad_x, grad_ref = output
    ctx.save_for_backward(x, labels, ref, ref_labels, row_stats, grad_x, grad_ref, *row_params)
    ctx.spec = (int(self_offset), bool(ref_is_x), int(loss), [float(p) for p in params])
    ctx.mark_non_differentiable(grad_x, grad_ref)
    ctx.set_materialize_grads(False)


def _backward(ctx, backward_op, grad_stats, _g_grad_x, _g_grad_ref):
    x, labels, ref, ref_labels, row_stats, grad_x, grad_ref, *row_params = ctx.saved_tensors
    self_offset, ref_is_x, loss, params = ctx.spec
    want_x = ctx.needs_input_grad[0]
    want_ref = ctx.needs_input_grad[2] and not ref_is_x
    want_rp = bool(row_params) and ctx.needs_input_grad[4]
    n_inputs = 9 + len(row_params)
    if grad_stats is None or not (want_x or want_ref or want_rp):
        return (None,) * n_inputs
    T = terms(loss)
    weights = torch.stack([grad_stats[:, c] for c in PAIR_TERM_SUM[:T]], dim=1).to(row_stats.dtype)
    # A loss with row parameters has one term and keeps d term_i / d row_param_i in AUX0.
    g_rp = (weights[:, 0] * row_stats[:, PairStat.AUX0]).to(row_params[0].dtype) if want_rp else None
    if not (want_x or want_ref):
        return (None, None, None, None, g_rp) + (None,) * 5
    precomputed = grad_x.shape[0] > 0 and (not want_ref or grad_ref.shape[0] > 0)
    if precomputed and not _oplib.create_graph():
        # The forward wrote each term's gradient of its unit-weight row sum; it is asked for only
        # by reductions that weight every anchor of a term alike (mean, sum): row 0's weight is
        # the term's weight.
        w = weights[:1].sum(0).view(T, 1, 1)
        gx = (grad_x * w).sum(0) if want_x else None
        gr = (grad_ref * w).sum(0) if want_ref else None
    else:
        gx, gr = backward_op(x, labels, ref, ref_labels, *row_params, row_stats, weights.contiguous(), self_offset,
                             ref_is_x, loss, params, want_ref)
    gx = gx.to(x.dtype) if want_x else None
    gr = gr.to(ref.dtype) if want_ref else None
    return (gx, None, gr, None) + ((g_rp,) if row_params else ()) + (None,) * 5


# The public function of each engine loss (for the error messages).
PUBLIC_NAMES = {int(v): ("triplet_margin" if k.startswith("triplet") else k) + "_loss" for k, v in LOSSES.items()}

LOSS_OP = _oplib.LossOp(
    OP, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context, backward=_backward,
    what=lambda *inputs: PUBLIC_NAMES[inputs[8]], triton=("structloss_fast.pairwise._triton", "forward", "backward"),
)
ROWPARAM_LOSS_OP = _oplib.LossOp(
    ROWPARAM_OP, fake=_fake_forward_rowparam, backward_fake=_fake_backward_rowparam, setup_context=_setup_context,
    backward=_backward, what="margin_based_loss (the pairwise op with per-anchor parameters)",
)


# ---------------------------------------------------------------- backends


def _check_supported(backend: str, *, x: Tensor, loss: int, num_refs=None, extended: bool = False,
                     miner: bool = False, listed: str | None = None):
    # extended: the params carry the PairExtParam block (a non-default distance or a fused miner);
    # listed: why the problem needs every pair listed (the pair-list reference, pairwise/tuples.py).
    if listed:
        return listed
    if backend == "triton":
        if extended:
            return "the Triton kernels take cosine similarities only (no distance= but the loss's default, no fused miner)"
        from . import _triton

        return _triton.check_supported(x, loss, num_refs)
    if backend == "cuda" and miner:
        return "fused miners run on the CPU engine"
    return None


_registry.declare(_registry.OpSpec(
    OP, family="pairwise", kernels=("cpu", "cuda", "triton"), gpu_order=("triton", "cuda"),
    check_supported=_check_supported,
    limits={"triton": "the loss has no Triton kernel (triplet loss over all triplets, generalized lifted "
                      "structure, tuplet margin, FastAP), batch-hard triplets over more than 2^24 references "
                      "in float32 (its configuration table has an entry for every D), or distance= is not the "
                      "loss's default: then cuda",
            "cuda": "a fused miner: then the miner's tuple is listed and the loss computed on it",
            "cpu": "a distance other than dot-product similarity (power 1) or an Lp distance with p = 2, or a "
                   "reducer that needs every pair's loss (DoNothingReducer, a ThresholdReducer other than "
                   "AvgNonZero on pair losses): then the pair-list reference (pairwise/tuples.py)"},
))
_registry.declare(_registry.OpSpec(
    ROWPARAM_OP, family="pairwise", kernels=("cpu",), check_supported=lambda backend, *, listed=None, **_: listed,
    limits={"cpu": "a distance other than the loss's default or a reducer that needs every triplet's loss: then "
                   "the pair-list reference (pairwise/tuples.py)"},
))


def op_name(loss: int) -> str:
    return ROWPARAM_OP if loss in PAIR_LOSSES_WITH_ROW_PARAMS else OP


def resolve(backend: str, x: Tensor, loss: int, ref=None, extended: bool = False, miner: bool = False,
            listed: str | None = None) -> str:
    if op_name(loss) != OP:  # the per-anchor-parameter op: CPU kernel and reference only
        return _registry.resolve(op_name(loss), backend, x.device, x=x, loss=loss, listed=listed)
    return _registry.resolve(OP, backend, x.device, x=x, loss=loss,
                             num_refs=x.shape[0] if ref is None else ref.shape[0],
                             extended=extended, miner=miner, listed=listed)


# ---------------------------------------------------------------- the one reduction


def row_terms(row_stats: Tensor, loss: int) -> Tensor:
    """Each anchor's terms (B, terms), differentiable (their gradient reaches the op's backward)."""
    return torch.stack([row_stats[:, c] for c in PAIR_TERM_SUM[:terms(loss)]], dim=1)


def totals(row_stats: Tensor, loss: int) -> Tensor:
    """What the reducers need of the whole batch, (terms + 2,) without gradient: each term's
    reducer count, then the numbers of positive and of negative pairs. (Summed over processes
    by DistributedPairwiseLoss before reduce_terms.)"""
    stats = row_stats.detach()
    cols = list(PAIR_TERM_COUNT[:terms(loss)]) + [PairStat.NUM_POS, PairStat.NUM_NEG]
    return torch.stack([stats[:, c].sum() for c in cols])


def reduce_terms(row_terms: Tensor, batch_totals: Tensor, loss: int, reduction: str) -> Tensor:
    """The loss from the anchors' terms, for every backend: per term k, the sum of the anchors'
    term_k divided ("mean") by the count its reducer divides by (at least 1), the terms added;
    "none": per anchor, the sum of its terms. The gated losses (SupCon, NT-Xent, as
    pytorch-metric-learning) give 0 for a batch without any positive or any negative pair."""
    T = terms(loss)
    if reduction == "none":
        out = row_terms.sum(dim=1)
    else:
        per_term = row_terms.sum(dim=0)
        if reduction == "mean":
            per_term = per_term / batch_totals[:T].clamp_min(1).to(per_term.dtype)
        out = per_term.sum()
    return out * gate(batch_totals, loss, out.dtype)


def gate(batch_totals: Tensor, loss: int, dtype) -> Tensor | float:
    """0 for the gated losses (SupCon, NT-Xent, as pytorch-metric-learning) on a batch without any
    positive or any negative pair, else 1."""
    if not PAIR_LOSS_INFO[loss].gated:
        return 1.0
    T = terms(loss)
    return ((batch_totals[T] > 0) & (batch_totals[T + 1] > 0)).to(dtype)


def reduce(row_stats: Tensor, loss: int, reduction: str) -> Tensor:
    return reduce_terms(row_terms(row_stats, loss), totals(row_stats, loss), loss, reduction)


def run(backend: str, x, labels, ref, ref_labels, self_offset: int, ref_is_x: bool, loss: int, params,
        grad_mode: int, row_params: Tensor | None = None) -> Tensor:
    """The row statistics (B, NUM_STATS) of a resolved backend. grad_mode != NONE only for
    reductions that weight all anchors of a term alike (see _backward). row_params (B,): the
    per-anchor parameters of the losses that take them (pairwise_loss_rowparam)."""
    params = [float(p) for p in params]
    tail = (int(self_offset), bool(ref_is_x), int(loss), params, int(grad_mode))
    if loss in PAIR_LOSSES_WITH_ROW_PARAMS:
        return ROWPARAM_LOSS_OP.op(backend)(x, labels, ref, ref_labels, row_params, *tail)[0]
    return LOSS_OP.op(backend)(x, labels, ref, ref_labels, *tail)[0]


"""Pairwise losses, by definition (docs/spec/pairwise.md).

Dense B x M matrices, plain autograd, in the input's dtype. Semantics are
pytorch-metric-learning's (PML 2.x: CosineSimilarity or LpDistance on F.normalize'd embeddings,
self-pairs excluded when no references are given, Circle's alphas detached, each class's
default reducer) with two deliberate differences:
- a NaN loss term is kept by the "average over non-zero losses" reductions (PML's `loss > 0`
  filter drops it), so that non-finite input gives a non-finite loss;
- PML returns 0 for pair losses whenever every index list has at most one pair (e.g. one
  anchor against two references); here every anchor with a positive and a negative counts.
Non-finite embeddings (or references) give a NaN loss whatever the labels (`nan_unless_finite`),
also when the labels form no usable pair and the terms alone would be 0.

Every loss is reduced from per-anchor *terms*: a loss is
    gate * sum_k (sum_i term_k[i]) / count_k            ("mean"; count_k = 1 when 0)
    gate * sum_k (sum_i term_k[i])                      ("sum")
and "none" returns sum_k term_k[i] per anchor. `count_k` is what the PML reducer divides by:
non-zero row losses (AvgNonZeroReducer on element losses), all rows (MeanReducer), all positive
pairs (NT-Xent), non-zero pair / triplet losses. `gate` is 0 when PML returns zero for the batch
as a whole (SupCon and NT-Xent without any positive or any negative pair).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1, eps=1e-12)


def cosine_similarity(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, ref.dtype)
    return unit_similarity(normalize(x.to(dtype)), normalize(ref.to(dtype)))


def unit_similarity(x_hat: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """s = x^ r^T of normalized rows: the one product every pairwise definition goes through
    (tests/pairwise/test_fp32_tensor_cores.py replaces it to emulate 3xTF32 arithmetic)."""
    return x_hat @ r_hat.T


def euclidean_distance(x_hat: torch.Tensor, r_hat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """||x^_i - r^_j|| of the normalized rows themselves, from their similarities s = x^ r^T:
    sqrt(||x^||^2 + ||r^||^2 - 2 s), so a zero row (x^ = 0) is at distance 1 from every unit
    vector, as torch.cdist on F.normalize'd rows (PML's LpDistance) gives. The gradient at zero
    distance is torch.cdist's (0); a NaN distance stays NaN."""
    sq = (x_hat.square().sum(1)[:, None] + r_hat.square().sum(1)[None, :] - 2 * s).clamp_min(0)
    keep = (sq > 0) | sq.isnan()
    safe = torch.where(keep, sq, torch.ones_like(sq))
    return torch.where(keep, safe.sqrt(), torch.zeros_like(sq))


def nan_unless_finite(out: torch.Tensor, *inputs) -> torch.Tensor:
    """out, or NaN everywhere when any input holds a non-finite value: a loss of non-finite
    embeddings is never a finite number, even when the labels leave no term to carry the NaN
    (PML gives NaN there too). A device-side test: no synchronisation."""
    finite = None
    for t in inputs:
        if t is None or t.numel() == 0:
            continue
        f = torch.isfinite(t).all()
        finite = f if finite is None else finite & f
    if finite is None:
        return out
    return out + torch.where(finite, 0.0, float("nan")).to(out.dtype)


def pair_masks(labels, ref_labels, self_index=None):
    """(positives, negatives) as B x M bool masks. self_index[i] is the reference column of
    anchor i itself (excluded from the positives), or None."""
    same = labels[:, None] == ref_labels[None, :]
    pos = same.clone()
    if self_index is not None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        pos[rows, self_index] = False
    return pos, ~same


def masked_logsumexp(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp over the masked entries; -inf for a row with none."""
    return a.masked_fill(~mask, float("-inf")).logsumexp(dim=1)


def softplus_exact(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) without a threshold (PML's log-sum-exp with an added zero)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def counts_nonzero(v: torch.Tensor) -> torch.Tensor:
    """1 where a loss term counts for AvgNonZeroReducer (> 0, or NaN)."""
    return (~(v <= 0)).to(v.dtype)


def reduce_terms(terms, counts, reduction, gate=None):
    """terms, counts: lists of (B,) tensors, one per term."""
    if reduction == "none":
        out = sum(terms)
        return out if gate is None else out * gate
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    total = 0
    for t, c in zip(terms, counts):
        s = t.sum()
        total = total + (s / c.sum().clamp_min(1) if reduction == "mean" else s)
    return total if gate is None else total * gate


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """AvgNonZeroReducer over per-anchor losses (NaN kept), or sum / none."""
    return reduce_terms([rows], [counts_nonzero(rows)], reduction)


class _Problem(NamedTuple):
    x_hat: torch.Tensor
    r_hat: torch.Tensor
    s: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor

    def distance(self) -> torch.Tensor:
        return euclidean_distance(self.x_hat, self.r_hat, self.s)


def _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index):
    """Normalized rows, similarities and pair masks, in the promoted dtype of embeddings and
    references (the kernels accept mixed dtypes, so the definition does too)."""
    if ref_embeddings is None:
        B = embeddings.shape[0]
        self_index = torch.arange(B, device=labels.device)
        x_hat = normalize(embeddings)
        return _Problem(x_hat, x_hat, unit_similarity(x_hat, x_hat), *pair_masks(labels, labels, self_index))
    M = ref_embeddings.shape[0]
    self_index = None
    if ref_self_index is not None and M > 0:
        self_index = (ref_self_index + torch.arange(embeddings.shape[0], device=labels.device)) % M
    dtype = torch.promote_types(embeddings.dtype, ref_embeddings.dtype)
    x_hat, r_hat = normalize(embeddings.to(dtype)), normalize(ref_embeddings.to(dtype))
    return _Problem(x_hat, r_hat, unit_similarity(x_hat, r_hat), *pair_masks(labels, ref_labels, self_index))


def _gate(pos, neg):
    return (pos.any() & neg.any()).to(torch.get_default_dtype())


def _twoset_rows(pos_logits, neg_logits, s, pos, neg):
    a = torch.where(pos, pos_logits(s), neg_logits(s))
    z = masked_logsumexp(a, pos) + masked_logsumexp(a, neg)
    valid = pos.any(dim=1) & neg.any(dim=1)
    return torch.where(valid, F.softplus(torch.where(valid, z, torch.zeros_like(z))), torch.zeros_like(z))


def _nonfinite_gives_nan(loss_fn):
    """A reference loss whose result is NaN when its embeddings or references are not finite."""
    @functools.wraps(loss_fn)
    def wrapped(embeddings, labels, *args, ref_embeddings=None, **kwargs):
        out = loss_fn(embeddings, labels, *args, ref_embeddings=ref_embeddings, **kwargs)
        return nan_unless_finite(out, embeddings, ref_embeddings)

    return wrapped


def _twoset_loss(pos_logits, neg_logits, embeddings, labels, ref_embeddings, ref_labels, reduction,
                 ref_self_index=None):
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    return reduce_rows(_twoset_rows(pos_logits, neg_logits, pb.s, pb.pos, pb.neg), reduction)


@_nonfinite_gives_nan
def circle_loss(embeddings, labels, m=0.4, gamma=80.0, ref_embeddings=None, ref_labels=None, reduction="mean",
                ref_self_index=None):
    """Circle loss, pair-level labels (Sun et al. 2020, Eq. 6; PML's CircleLoss)."""
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m

    def pos_logits(s):
        return -gamma * torch.relu(op - s.detach()) * (s - delta_p)

    def neg_logits(s):
        return gamma * torch.relu(s.detach() - on) * (s - delta_n)

    return _twoset_loss(pos_logits, neg_logits, embeddings, labels, ref_embeddings, ref_labels, reduction,
                        ref_self_index)


@_nonfinite_gives_nan
def unified_loss(embeddings, labels, m=0.35, gamma=64.0, ref_embeddings=None, ref_labels=None, reduction="mean",
                 ref_self_index=None):
    """The paper's unified loss (Eq. 1), pair-level: softplus(LSE_N gamma (s + m) + LSE_P (-gamma s))."""
    return _twoset_loss(lambda s: -gamma * s, lambda s: gamma * (s + m), embeddings, labels, ref_embeddings,
                        ref_labels, reduction, ref_self_index)


@_nonfinite_gives_nan
def multi_similarity_loss(embeddings, labels, alpha=2.0, beta=50.0, base=0.5, ref_embeddings=None,
                          ref_labels=None, reduction="mean", ref_self_index=None):
    """Multi-similarity loss (Wang et al. 2019; PML's MultiSimilarityLoss, MeanReducer over anchors):
    (1/alpha) log(1 + sum_P exp(-alpha (s - base))) + (1/beta) log(1 + sum_N exp(beta (s - base)))."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg = pb.s, pb.pos, pb.neg
    pos_term = softplus_exact(masked_logsumexp(alpha * (base - s), pos)) / alpha
    neg_term = softplus_exact(masked_logsumexp(beta * (s - base), neg)) / beta
    rows = pos_term + neg_term
    return reduce_terms([rows], [torch.ones_like(rows)], reduction)


@_nonfinite_gives_nan
def supcon_loss(embeddings, labels, temperature=0.1, ref_embeddings=None, ref_labels=None, reduction="mean",
                ref_self_index=None):
    """Supervised contrastive loss (Khosla et al. 2020; PML's SupConLoss, AvgNonZeroReducer):
    -(1/|P|) sum_P [s_ip/t - LSE_{k in P u N} s_ik/t], 0 for anchors without positives; 0 for the
    batch when it has no positive or no negative pair at all."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg = pb.s, pb.pos, pb.neg
    a = s / temperature
    lse = masked_logsumexp(a, pos | neg)
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    mean_pos = torch.where(pos, a, torch.zeros_like(a)).sum(dim=1) / n_pos.clamp_min(1).to(a.dtype)
    rows = torch.where(has_pos, torch.where(has_pos, lse, torch.zeros_like(lse)) - mean_pos, torch.zeros_like(lse))
    return reduce_terms([rows], [counts_nonzero(rows)], reduction, gate=_gate(pos, neg).to(rows.dtype))


@_nonfinite_gives_nan
def ntxent_loss(embeddings, labels, temperature=0.07, ref_embeddings=None, ref_labels=None, reduction="mean",
                ref_self_index=None):
    """NT-Xent / InfoNCE with label-defined positives (PML's NTXentLoss, MeanReducer over positive
    pairs): for each positive pair, softplus(LSE_N s_in/t - s_ip/t). "none" sums per anchor."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg = pb.s, pb.pos, pb.neg
    a = s / temperature
    lse_n = masked_logsumexp(a, neg)
    pair = softplus_exact(lse_n[:, None] - a)
    rows = torch.where(pos, pair, torch.zeros_like(pair)).sum(dim=1)
    return reduce_terms([rows], [pos.sum(dim=1).to(rows.dtype)], reduction, gate=_gate(pos, neg).to(rows.dtype))


@_nonfinite_gives_nan
def contrastive_loss(embeddings, labels, pos_margin=0.0, neg_margin=1.0, ref_embeddings=None, ref_labels=None,
                     reduction="mean", ref_self_index=None):
    """Contrastive loss (Hadsell et al. 2006; PML's ContrastiveLoss with LpDistance on normalized
    embeddings): relu(d - pos_margin) over positive pairs and relu(neg_margin - d) over negative
    pairs, each averaged over its non-zero pair losses, then added. "none" sums per anchor."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    pos, neg, d = pb.pos, pb.neg, pb.distance()
    lp = torch.where(pos, torch.relu(d - pos_margin), torch.zeros_like(d))
    ln = torch.where(neg, torch.relu(neg_margin - d), torch.zeros_like(d))
    terms = [lp.sum(dim=1), ln.sum(dim=1)]
    counts = [(counts_nonzero(lp) * pos).sum(dim=1), (counts_nonzero(ln) * neg).sum(dim=1)]
    return reduce_terms(terms, counts, reduction)


@_nonfinite_gives_nan
def triplet_margin_loss(embeddings, labels, margin=0.05, mining="all", ref_embeddings=None, ref_labels=None,
                        reduction="mean", ref_self_index=None):
    """Triplet margin loss (PML's TripletMarginLoss, LpDistance, AvgNonZeroReducer over triplets):
    relu(d_ap - d_an + margin) over every triplet ("all"), or over the hardest positive (largest
    d_ap) and hardest negative (smallest d_an) of each anchor ("batch_hard", PML's BatchHardMiner)."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    pos, neg, d = pb.pos, pb.neg, pb.distance()
    if mining == "all":
        t = d[:, :, None] - d[:, None, :] + margin  # (B, P, N)
        valid = pos[:, :, None] & neg[:, None, :]
        lt = torch.where(valid, torch.relu(t), torch.zeros_like(t))
        rows = lt.sum(dim=(1, 2))
        counts = (counts_nonzero(lt) * valid).sum(dim=(1, 2))
        return reduce_terms([rows], [counts], reduction)
    if mining == "batch_hard":
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        if d.shape[1] == 0:  # no references: no triplet (max/min of nothing)
            return reduce_terms([d.sum(dim=1)], [d.sum(dim=1)], reduction)
        d_ap = torch.where(pos, d, -inf).max(dim=1).values
        d_an = torch.where(neg, d, inf).min(dim=1).values
        valid = pos.any(dim=1) & neg.any(dim=1)
        rows = torch.where(valid, torch.relu(torch.where(valid, d_ap - d_an, torch.zeros_like(d_ap)) + margin),
                           torch.zeros_like(d_ap))
        return reduce_terms([rows], [counts_nonzero(rows) * valid], reduction)
    raise ValueError(f"mining must be 'all' or 'batch_hard', got {mining!r}")


@_nonfinite_gives_nan
def generalized_lifted_structure_loss(embeddings, labels, pos_margin=0.0, neg_margin=1.0, ref_embeddings=None,
                                      ref_labels=None, reduction="mean", ref_self_index=None):
    """Generalized lifted structure loss (Hermans et al. 2017, p. 4; PML's
    GeneralizedLiftedStructureLoss, LpDistance, MeanReducer over anchors):
    relu(LSE_P (d - pos_margin) + LSE_N (neg_margin - d)), an empty set's LSE counting as 0."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg, d = pb.s, pb.pos, pb.neg, pb.distance()
    zero = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    lse_p = torch.where(pos.any(dim=1), masked_logsumexp(d - pos_margin, pos), zero)
    lse_n = torch.where(neg.any(dim=1), masked_logsumexp(neg_margin - d, neg), zero)
    rows = torch.relu(lse_p + lse_n)
    return reduce_terms([rows], [torch.ones_like(rows)], reduction)


def tuplet_cos(s, margin):
    """cos(acos(s) - margin) written as c cos m + sin(theta) sin m, c = clamp(s, -1, 1), with the
    square root's gradient 0 at 0 (so the derivative is cos m at |s| = 1 and 0 beyond)."""
    c = s.clamp(-1, 1)
    sq = (1 - c) * (1 + c)
    sin_t = torch.where(sq > 0, torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return c * math.cos(margin) + sin_t * math.sin(margin)


@_nonfinite_gives_nan
def tuplet_margin_loss(embeddings, labels, margin=math.radians(5.73), scale=64.0, ref_embeddings=None,
                       ref_labels=None, reduction="mean", ref_self_index=None):
    """Tuplet margin loss (Yu and Tao 2019; PML's TupletMarginLoss, cosine similarity, MeanReducer
    over positive pairs): for each positive pair, log(1 + sum_N exp(scale (s_n - cos(theta_p -
    margin)))), theta_p = acos(s_p); margin in radians. "none" sums per anchor; 0 for a batch
    without any positive or any negative pair."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg = pb.s, pb.pos, pb.neg
    lse_n = masked_logsumexp(scale * s, neg)
    pair = softplus_exact(lse_n[:, None] - scale * tuplet_cos(s, margin))
    rows = torch.where(pos, pair, torch.zeros_like(pair)).sum(dim=1)
    return reduce_terms([rows], [pos.sum(dim=1).to(rows.dtype)], reduction, gate=_gate(pos, neg).to(rows.dtype))


@_nonfinite_gives_nan
def margin_based_loss(embeddings, labels, margin=0.2, beta=1.2, nu=0.0, ref_embeddings=None, ref_labels=None,
                reduction="mean", ref_self_index=None):
    """Margin loss (Wu et al. 2017; PML's MarginLoss with triplets_per_anchor="all", LpDistance,
    DivisorReducer): over every triplet (a, p, n), relu(d_ap - beta_a + margin) +
    relu(beta_a - d_an + margin), summed and divided by the number of non-zero (or NaN) parts.
    beta: a float, a one-element tensor, or a per-anchor (B,) tensor (PML's class-specific beta,
    already indexed by the anchors' labels). nu: weight of the beta regularizer (PML adds it when
    beta is learned): nu * beta once for a single beta, nu * sum over triplets of beta_a divided
    like the loss for a per-anchor beta; "none" returns the anchors' triplet sums without it.

    Every positive pair's part recurs once per negative of its anchor and vice versa, so the
    anchor's triplet sum is |N| sum_P relu(d_p - beta + margin) + |P| sum_N relu(beta - d_n +
    margin) (O(B M) memory; the same as the explicit B x P x N sum)."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg, d = pb.s, pb.pos, pb.neg, pb.distance()
    B = s.shape[0]
    single = not torch.is_tensor(beta) or beta.numel() == 1
    b = torch.as_tensor(beta, dtype=s.dtype, device=s.device).reshape(-1).expand(B) if single else beta.to(s.dtype)
    lp = torch.where(pos, torch.relu(d - b[:, None] + margin), torch.zeros_like(d))
    ln = torch.where(neg, torch.relu(b[:, None] - d + margin), torch.zeros_like(d))
    n_p, n_n = pos.sum(dim=1).to(s.dtype), neg.sum(dim=1).to(s.dtype)
    rows = n_n * lp.sum(dim=1) + n_p * ln.sum(dim=1)
    counts = n_n * (counts_nonzero(lp) * pos).sum(dim=1) + n_p * (counts_nonzero(ln) * neg).sum(dim=1)
    out = reduce_terms([rows], [counts], reduction)
    return out if reduction == "none" else out + margin_beta_regularizer(b, nu, n_p * n_n, counts.sum(), single,
                                                                         reduction)


def margin_beta_regularizer(beta_rows, nu, triplets, divisor, single, reduction):
    """PML's beta_reg_loss of MarginLoss: nu * beta once when there is a triplet (one beta);
    nu * sum_i triplets_i beta_i, divided by the loss's divisor for "mean" (0 when it is 0),
    for a beta per anchor."""
    if nu == 0:
        return torch.zeros((), dtype=beta_rows.dtype, device=beta_rows.device)
    any_triplet = (triplets.sum() > 0).to(beta_rows.dtype)
    if single:
        return nu * beta_rows[:1].sum() * any_triplet if beta_rows.numel() else beta_rows.sum() * 0
    total = nu * (triplets * beta_rows).sum()
    if reduction == "mean":
        total = torch.where(divisor > 0, total / divisor.clamp_min(1), torch.zeros_like(total))
    return total


@_nonfinite_gives_nan
def fastap_loss(embeddings, labels, num_bins=10, ref_embeddings=None, ref_labels=None, reduction="mean",
                ref_self_index=None):
    """FastAP (Cakir et al. 2019; PML's FastAPLoss, squared Euclidean distances of the normalized
    embeddings binned by triangular pulses at num_bins + 1 centers in [0, 4]): per anchor with
    positives, 1 - (1/|P|) sum_k h+_k H+_k / H_k over the bins where h+_k H+_k > 0 and H_k > 0
    (h+ the positives' histogram, H+ and H the cumulative histograms of the positives and of all
    pairs); "mean" over the anchors with positives. A NaN distance makes the anchor's loss NaN."""
    pb = _problem(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
    s, pos, neg = pb.s, pb.pos, pb.neg
    # ||x^ - r^||^2 of the normalized rows (a zero row at squared distance 1, as PML's LpDistance).
    d2 = (pb.x_hat.square().sum(1)[:, None] + pb.r_hat.square().sum(1)[None, :] - 2 * s).clamp_min(0)
    centers = torch.linspace(0.0, 4.0, num_bins + 1, dtype=s.dtype, device=s.device)
    pulse = torch.relu(1 - (d2[:, :, None] - centers).abs() / (4.0 / num_bins))  # (B, M, E)
    h_pos = (pulse * pos[:, :, None].to(s.dtype)).sum(dim=1)
    h_neg = (pulse * neg[:, :, None].to(s.dtype)).sum(dim=1)
    cum_pos, cum_all = h_pos.cumsum(dim=1), (h_pos + h_neg).cumsum(dim=1)
    prod = h_pos * cum_pos
    safe = (prod > 0) & (cum_all > 0)
    ap = torch.where(safe, prod / torch.where(safe, cum_all, torch.ones_like(cum_all)), torch.zeros_like(prod))
    n_pos = pos.sum(dim=1).to(s.dtype)
    has_pos = n_pos > 0
    rows = torch.where(has_pos, 1 - ap.sum(dim=1) / n_pos.clamp_min(1), torch.zeros_like(n_pos))
    has_nan = (d2.isnan() & (pos | neg)).any(dim=1)
    rows = torch.where(has_pos & has_nan, torch.full_like(rows, float("nan")), rows)
    return reduce_terms([rows], [has_pos.to(s.dtype)], reduction)


def npairs_pairs(labels):
    """PML's NPairsLoss pairs: for each label with at least two samples, in increasing label
    order, the first sample of that label (the anchor) and the second (its positive)."""
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    B = labels.shape[0]
    starts = torch.ones(B, dtype=torch.bool, device=labels.device)
    if B > 1:
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    nxt = torch.zeros_like(starts)
    if B > 1:
        nxt[:-1] = ~starts[1:]  # the next sorted sample has the same label
    first = starts & nxt
    idx = first.nonzero().flatten()
    return order[idx], order[idx + 1]


def npairs_loss(embeddings, labels, reduction="mean"):
    """N-pair loss (Sohn 2016; PML's NPairsLoss with its default distance, cosine similarity):
    cross-entropy of the K x K similarities of the anchors with the positives of npairs_pairs,
    the diagonal as targets; "mean" over the K pairs, "none" (B,) with each anchor's loss."""
    a, p = npairs_pairs(labels)
    sim = cosine_similarity(embeddings[a], embeddings[p])
    target = torch.arange(a.shape[0], device=labels.device)
    if reduction == "none":
        out = embeddings.new_zeros(embeddings.shape[0])
        return out.index_put((a,), F.cross_entropy(sim, target, reduction="none"))
    if a.shape[0] == 0:
        return embeddings.sum() * 0
    return F.cross_entropy(sim, target, reduction=reduction)

"""The pairwise losses on listed pairs or triplets: pytorch-metric-learning's (PML) semantics for
an `indices_tuple`, in plain PyTorch (autograd), O(pairs x D) work and O(pairs) memory, never a
B x M matrix.

An indices_tuple is PML's: pairs (a1, p, a2, n) (positive pairs (a1[k], p[k]), negative pairs
(a2[k], n[k])) or triplets (a, p, n); anchors index the embeddings, the others the references
(the embeddings themselves by default). Each loss reads it as PML's class does (its row in
_semantics.SEMANTICS): the pair losses take triplets as (a, p, a, n) and give 0 when every list
holds at most one entry; the mat-based ones (Circle, multi-similarity, SupCon) collapse repeated
pairs into a mask (a pair listed as both positive and negative is an error), NT-Xent and
contrastive take each listed pair; the triplet loss crosses pairs into the triplets
(a1[k], p[k], n[l]) with a1[k] = a2[l]. The per-element losses go to the reducers
(structloss_fast/pairwise/reducers.py).

This module is also the definition of the losses with a distance the fused engine does not
compute, with all pairs listed (docs/spec/pairwise.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._semantics import SEMANTICS
from .distances import DistanceSpec
from .reducers import Elements

# Pairs per chunk of the gathered rows (chunk x D floats at a time).
CHUNK = 1 << 14


# ---------------------------------------------------------------- the tuples


def check_indices_tuple(indices_tuple, B: int, M: int, device) -> tuple[Tensor, ...]:
    """PML's tuple as int64 tensors on `device`, checked: 3 or 4 1-D integer tensors, the lists of
    a pair or triplet of equal length, anchors in [0, B) and the others in [0, M)."""
    if isinstance(indices_tuple, (str, bytes)) or not hasattr(indices_tuple, "__len__"):
        raise TypeError(f"indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors, "
                        f"got {type(indices_tuple).__name__}")
    parts = list(indices_tuple)
    if len(parts) not in (3, 4):
        raise ValueError(f"indices_tuple must hold 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {len(parts)}")
    out = []
    for k, t in enumerate(parts):
        t = torch.as_tensor(t, device=device)
        if t.dim() != 1 or (t.numel() > 0 and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)):
            raise ValueError(f"indices_tuple[{k}] must be a 1-D integer tensor, got shape {tuple(t.shape)}, "
                             f"dtype {t.dtype}")
        out.append(t.to(torch.int64))
    groups = [(0, 1, 2)] if len(out) == 3 else [(0, 1), (2, 3)]
    for g in groups:
        if len({out[k].numel() for k in g}) != 1:
            raise ValueError(f"indices_tuple: tensors {list(g)} must have one length, got "
                             f"{[out[k].numel() for k in g]}")
    anchors = (0,) if len(out) == 3 else (0, 2)
    for k, t in enumerate(out):
        bound = B if k in anchors else M
        if t.numel() and (bool(t.min() < 0) or bool(t.max() >= bound)):
            raise ValueError(f"indices_tuple[{k}] must index [0, {bound}) ({'anchors' if k in anchors else 'references'}), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
    return tuple(out)


def to_pairs(t: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PML's convert_to_pairs for a given tuple: triplets (a, p, n) become (a, p, a, n)."""
    if len(t) == 4:
        return t
    a, p, n = t
    return a, p, a, n


def to_triplets(t: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """PML's convert_to_triplets: pairs become every (a1[k], p[k], n[l]) with a1[k] = a2[l], in
    PML's order, without its len(a1) x len(a2) matrix."""
    if len(t) == 3:
        return t
    a1, p, a2, n = t
    order = torch.argsort(a2, stable=True)
    a2s, ns = a2[order], n[order]
    start = torch.searchsorted(a2s, a1, right=False)
    count = torch.searchsorted(a2s, a1, right=True) - start
    k = torch.repeat_interleave(torch.arange(a1.numel(), device=a1.device), count)
    offset = torch.arange(k.numel(), device=a1.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return a1[k], p[k], ns[start[k] + offset]


def all_pairs(labels: Tensor, ref_labels: Tensor | None, ref_self_index: int | None, M: int):
    """Every positive and negative pair (PML's get_all_pairs_indices; without references the
    diagonal is no pair, with ref_self_index the anchor's own slot is no positive)."""
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    pos = same.clone()
    rows = torch.arange(labels.shape[0], device=labels.device)
    if ref_labels is None:
        pos[rows, rows] = False
    elif ref_self_index is not None and M > 0:
        pos[rows, (ref_self_index + rows) % M] = False
    a1, p = torch.nonzero(pos, as_tuple=True)
    a2, n = torch.nonzero(~same, as_tuple=True)
    return a1, p, a2, n


def _unique_pairs(a: Tensor, b: Tensor, M: int) -> tuple[Tensor, Tensor, Tensor]:
    key = torch.unique(a * max(M, 1) + b)
    return key // max(M, 1), key % max(M, 1), key


def anchor_weights(t: tuple | None, B: int, dtype, device) -> Tensor:
    """PML's convert_to_weights (FastAP): each batch row's number of appearances anywhere in the
    tuple over the largest such number; all ones without a tuple or with empty lists."""
    if t is None or all(u.numel() == 0 for u in t):
        return torch.ones(B, dtype=dtype, device=device)
    counts = torch.zeros(B, dtype=dtype, device=device).index_add(
        0, torch.cat(t), torch.ones(sum(u.numel() for u in t), dtype=dtype, device=device))
    return counts / counts.max()


def first_per_label(a: Tensor, p: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """PML's convert_to_pos_pairs_with_unique_labels (NPairs): for each label among the anchors
    (in increasing label order), its first positive pair in the list."""
    if a.numel() == 0:
        return a, p
    la = labels[a]
    order = torch.sort(la, stable=True).indices
    sl = la[order]
    first = torch.ones_like(sl, dtype=torch.bool)
    first[1:] = sl[1:] != sl[:-1]
    keep = order[first]
    return a[keep], p[keep]


# ---------------------------------------------------------------- pair values


# A strip of anchors whose listed pairs fill at least 1 / DENSE_RATIO of its strip x M
# similarities is computed with one GEMM and gathered (a GEMM's multiply-add is some 30 times
# cheaper than a gathered row's); sparser strips gather the listed rows only. Either way the
# work is O(pairs x D) up to that constant, and memory O(strip x M), never B x M.
DENSE_RATIO = 16


def _plan(rows: Tensor, B: int, M: int):
    """Strips (r0, r1, k0, k1, dense) of the anchors of the pairs (sorted by anchor)."""
    T = max(1, min(B, (1 << 22) // max(M, 1)))
    bounds = torch.searchsorted(rows, torch.arange(0, B + T, T, device=rows.device).clamp_max(B)).tolist()
    plan = []
    for k, r0 in enumerate(range(0, B, T)):
        r1 = min(B, r0 + T)
        k0, k1 = bounds[k], bounds[k + 1]
        if k1 > k0:
            plan.append((r0, r1, k0, k1, (k1 - k0) * DENSE_RATIO >= (r1 - r0) * M))
    return plan


class _PairValues(torch.autograd.Function):
    """v_k = <x[rows_k], r[cols_k]> ("dot") or ||x[rows_k] - r[cols_k]||_p ("lp") for the listed
    pairs: dense strips of anchors by a GEMM, sparse ones by gathering the rows in chunks of
    CHUNK pairs (pairs sorted by anchor first, unless they already are, as miners list them)."""

    @staticmethod
    def forward(ctx, x, r, rows, cols, kind, p):
        B, M = x.shape[0], r.shape[0]
        order = None
        if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
            order = torch.argsort(rows, stable=True)
            rows, cols = rows[order], cols[order]
        plan = _plan(rows, B, M)
        lp2 = kind == "lp" and p == 2.0
        nx = (x * x).sum(1) if lp2 else None
        nr = (r * r).sum(1) if lp2 else None
        out = x.new_empty(rows.shape[0])
        for r0, r1, k0, k1, dense in plan:
            a, c = rows[k0:k1], cols[k0:k1]
            if dense and (kind == "dot" or lp2):
                g = (x[r0:r1] @ r.T)[a - r0, c]
                out[k0:k1] = g if kind == "dot" else (nx[a] + nr[c] - 2 * g).clamp_min(0).sqrt()
                continue
            for q in range(k0, k1, CHUNK):
                e = min(k1, q + CHUNK)
                xa, rb = x[rows[q:e]], r[cols[q:e]]
                out[q:e] = (xa * rb).sum(1) if kind == "dot" else torch.linalg.vector_norm(xa - rb, ord=p, dim=1)
        ctx.save_for_backward(x, r, rows, cols, out, order)
        ctx.kind, ctx.p, ctx.plan = kind, p, plan
        if order is None:
            return out
        return torch.empty_like(out).index_copy_(0, order, out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, r, rows, cols, out, order = ctx.saved_tensors
        kind, p = ctx.kind, ctx.p
        if order is not None:
            g = g[order]
        if kind == "lp":
            # d ||u||_p / du = sign(u) |u|^(p-1) / ||u||^(p-1); 0 at u = 0 (torch.cdist's convention).
            g = torch.where(out.isnan(), out, torch.where(out > 0, g / out.pow(p - 1), torch.zeros_like(out)))
        gx, gr = torch.zeros_like(x), torch.zeros_like(r)
        for r0, r1, k0, k1, dense in ctx.plan:
            a, c = rows[k0:k1], cols[k0:k1]
            if dense and (kind == "dot" or p == 2.0):
                G = x.new_zeros(r1 - r0, r.shape[0]).index_put_((a - r0, c), g[k0:k1], accumulate=True)
                xs = x[r0:r1]
                if kind == "dot":
                    gx[r0:r1] += G @ r
                    gr += G.T @ xs
                else:  # d(||x_a - r_b||)/dx_a = (x_a - r_b) / d: G holds g / d
                    gx[r0:r1] += G.sum(1, keepdim=True) * xs - G @ r
                    gr += G.sum(0).unsqueeze(1) * r - G.T @ xs
                continue
            for q in range(k0, k1, CHUNK):
                e = min(k1, q + CHUNK)
                ra, cb, gc = rows[q:e], cols[q:e], g[q:e, None]
                xa, rb = x[ra], r[cb]
                if kind == "dot":
                    da, db = gc * rb, gc * xa
                else:
                    diff = xa - rb
                    da = gc * (diff if p == 2.0 else diff.sign() * diff.abs().pow(p - 1))
                    db = -da
                gx.index_add_(0, ra, da)
                gr.index_add_(0, cb, db)
        return (gx if ctx.needs_input_grad[0] else None), (gr if ctx.needs_input_grad[1] else None), \
            None, None, None, None


def pair_values(xq: Tensor, xr: Tensor, rows: Tensor, cols: Tensor, dist: DistanceSpec) -> Tensor:
    """PML's distance matrix at the listed pairs (xq, xr already normalized when the distance
    normalizes)."""
    if dist.inverted:
        v = _PairValues.apply(xq, xr, rows, cols, "dot", 2.0)
    else:
        v = _PairValues.apply(xq, xr, rows, cols, "lp", float(dist.p))
    return v if dist.power == 1 else v ** dist.power


# ---------------------------------------------------------------- per-anchor reductions


def segment_lse(values: Tensor, seg: Tensor, B: int) -> Tensor:
    """Per anchor, the log-sum-exp of its values; -inf for an anchor without any."""
    m = values.new_full((B,), float("-inf")).scatter_reduce(0, seg, values.detach(), "amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = values.new_zeros(B).index_add(0, seg, torch.exp(values - m[seg]))
    return torch.log(s) + m


def segment_sum(values: Tensor, seg: Tensor, B: int) -> Tensor:
    return values.new_zeros(B).index_add(0, seg, values)


def segment_count(seg: Tensor, B: int, dtype) -> Tensor:
    return torch.zeros(B, dtype=dtype, device=seg.device).index_add(0, seg, torch.ones(seg.shape, dtype=dtype,
                                                                                        device=seg.device))


def _oriented(v: Tensor, inverted: bool) -> Tensor:
    """PML's similarity losses negate a distance (SupCon, NT-Xent)."""
    return v if inverted else -v


# ---------------------------------------------------------------- the losses


def _twoset(name, params, vp, a1, vn, a2, B, dist):
    if name == "circle":
        m, gamma = params
        lp = -gamma * torch.relu(1 + m - vp.detach()) * (vp - (1 - m))
        ln = gamma * torch.relu(vn.detach() + m) * (vn - m)
    else:  # unified
        m, gamma = params
        lp, ln = -gamma * vp, gamma * (vn + m)
    z = segment_lse(lp, a1, B) + segment_lse(ln, a2, B)
    valid = (segment_count(a1, B, torch.long) > 0) & (segment_count(a2, B, torch.long) > 0)
    return torch.where(valid, F.softplus(torch.where(valid, z, torch.zeros_like(z))), torch.zeros_like(z))


def _multi_similarity(params, vp, a1, vn, a2, B, dist):
    alpha, beta, base = params
    # PML: pos_exp = distance.margin(mat, base), neg_exp = distance.margin(base, mat)
    pos_exp = base - vp if dist.inverted else vp - base
    neg_exp = vn - base if dist.inverted else base - vn
    zero = vp.new_zeros(B)
    return (torch.logaddexp(segment_lse(alpha * pos_exp, a1, B), zero) / alpha
            + torch.logaddexp(segment_lse(beta * neg_exp, a2, B), zero) / beta)


def _supcon(params, vp, a1, vn, a2, B, dist):
    (t,) = params
    ap, an = _oriented(vp, dist.inverted) / t, _oriented(vn, dist.inverted) / t
    lse = segment_lse(torch.cat([ap, an]), torch.cat([a1, a2]), B)
    n_pos = segment_count(a1, B, ap.dtype)
    mean_pos = segment_sum(ap, a1, B) / n_pos.clamp_min(1)
    has = n_pos > 0
    return torch.where(has, torch.where(has, lse, torch.zeros_like(lse)) - mean_pos, torch.zeros_like(lse))


def _lse_with_zero(z: Tensor) -> Tensor:
    """log(1 + e^z) as PML's logsumexp(add_one=True) rounds it (exactly 0 once e^z < 2^-53, which
    its non-zero reducers count), stable for large z."""
    m = z.detach().clamp_min(0)
    return m + torch.log(torch.exp(-m) + torch.exp(z - m))


def _lse_or_zero(values: Tensor, seg: Tensor, B: int) -> Tensor:
    """PML's masked logsumexp(add_one=False): 0 for an anchor without values."""
    lse = segment_lse(values, seg, B)
    return torch.where(segment_count(seg, B, torch.long) > 0, lse, torch.zeros_like(lse))


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with derivative 0 at 0 (the tuplet margin's choice at an identical positive pair)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _margin(params, aux, x, ref, t, dist):
    a, p, n = to_triplets(t)
    if a.numel() == 0:
        return None
    (margin,) = params
    beta_rows = aux["beta_rows"]
    beta = beta_rows[a].to(x.dtype)
    ap, an = pair_values(x, ref, a, p, dist), pair_values(x, ref, a, n, dist)
    # PML: relu(distance.margin(d_ap, beta) + margin), relu(distance.margin(beta, d_an) + margin)
    pos = torch.relu((beta - ap if dist.inverted else ap - beta) + margin)
    neg = torch.relu((an - beta if dist.inverted else beta - an) + margin)
    divisor = (pos > 0).sum() + (neg > 0).sum()
    out = {"margin_loss": Elements(pos + neg, (a, p, n), "triplet", divisor)}
    if not aux["learned"]:
        out["beta_reg_loss"] = Elements(0, None, "already_reduced")
    elif aux["single"]:
        out["beta_reg_loss"] = Elements(beta_rows[:1].to(x.dtype) * aux["nu"], None, "already_reduced")
    else:
        out["beta_reg_loss"] = Elements(beta * aux["nu"], a, "element", divisor)
    return out


def _fastap(params, aux, x, ref, t, dist):
    a1, p, a2, n = to_pairs(t)
    B = x.shape[0]
    n_pos = segment_count(a1, B, x.dtype)
    safe_n = n_pos > 0
    if not bool(safe_n.any()):
        return None
    (num_bins,) = params
    num_bins = int(num_bins)
    top = 2.0 ** dist.power  # PML's histogram_max (the squared distances of unit vectors: [0, 4])
    centers = torch.linspace(0.0, top, num_bins + 1, dtype=x.dtype, device=x.device)

    def hist(v, seg):
        pulse = torch.relu(1 - (v[:, None] - centers).abs() / (top / num_bins))
        return x.new_zeros(B, num_bins + 1).index_add(0, seg, pulse)

    h_pos = hist(pair_values(x, ref, a1, p, dist), a1)
    h_all = h_pos + hist(pair_values(x, ref, a2, n, dist), a2)
    product = h_pos * h_pos.cumsum(1)
    total = h_all.cumsum(1)
    safe = (product > 0) & (total > 0)
    if not bool(safe.any()):
        return None
    fast_ap = torch.where(safe, product / torch.where(safe, total, torch.ones_like(total)), torch.zeros_like(total))
    anchors = safe_n.nonzero().flatten()
    losses = (1 - fast_ap.sum(1)[anchors] / n_pos[anchors]) * aux["weights"][anchors].to(x.dtype)
    return {"loss": Elements(losses, anchors, "element")}


def _npairs(aux, x, ref, t, dist):
    a, p = first_per_label(*to_pairs(t)[:2], aux["labels"])
    if a.numel() == 0:
        return None
    xa, xp = x[a], ref[p]
    if dist.inverted:
        sim = xa @ xp.T
    else:
        sim = torch.cdist(xa, xp, p=dist.p)
    if dist.power != 1:
        sim = sim ** dist.power
    if not dist.inverted:
        sim = -sim
    losses = F.cross_entropy(sim, torch.arange(a.numel(), device=x.device), reduction="none")
    return {"loss": Elements(losses, a, "element")}


def element_losses(name: str, params: tuple, x: Tensor, ref: Tensor, t: tuple, dist: DistanceSpec, *,
                   swap: bool = False, smooth_loss: bool = False, aux: dict | None = None) -> dict[str, Elements] | None:
    """PML's loss dict (sub-loss name -> Elements) of loss `name` over the tuple `t` (checked);
    None where PML returns its zero loss. x, ref: the rows the distance reads (normalized when it
    normalizes, ref may be x). aux: what a loss needs besides the tuple (MarginLoss: beta_rows (B,),
    nu, learned, single; FastAP: the anchors' weights; NPairs: the labels)."""
    sem = SEMANTICS[name]
    B, M = x.shape[0], ref.shape[0]
    if name == "margin":
        return _margin(params, aux, x, ref, t, dist)
    if name == "fastap":
        return _fastap(params, aux, x, ref, t, dist)
    if name == "npairs":
        return _npairs(aux, x, ref, t, dist)
    if sem.tuples == "triplets":
        a, p, n = to_triplets(t)
        if a.numel() == 0:
            return None
        ap, an = pair_values(x, ref, a, p, dist), pair_values(x, ref, a, n, dist)
        if swap:  # PML indexes the embeddings with the positive's index here
            pn = pair_values(x, ref, p, n, dist)
            an = torch.maximum(an, pn) if dist.inverted else torch.minimum(an, pn)
        (margin,) = params
        violation = (an - ap if dist.inverted else ap - an) + margin
        losses = F.softplus(violation) if smooth_loss else torch.relu(violation)
        return {"loss": Elements(losses, (a, p, n), "triplet")}
    a1, p, a2, n = to_pairs(t)
    if sem.tuples == "mask":
        a1, p, kp = _unique_pairs(a1, p, M)
        a2, n, kn = _unique_pairs(a2, n, M)
        if kp.numel() and kn.numel() and bool(torch.isin(kp, kn).any()):
            raise ValueError("indices_tuple: a pair is listed both as positive and as negative (PML: 'Each pair "
                             "should be either be positive or negative')")
    vp, vn = pair_values(x, ref, a1, p, dist), pair_values(x, ref, a2, n, dist)
    arange = torch.arange(B, device=x.device)
    if name in ("circle", "unified"):
        return {"loss": Elements(_twoset(name, params, vp, a1, vn, a2, B, dist), arange, "element")}
    if name == "multi_similarity":
        return {"loss": Elements(_multi_similarity(params, vp, a1, vn, a2, B, dist), arange, "element")}
    if name == "supcon":
        if a1.numel() == 0 or a2.numel() == 0:
            return None
        return {"loss": Elements(_supcon(params, vp, a1, vn, a2, B, dist), arange, "element")}
    if name == "ntxent":
        if a1.numel() == 0 or a2.numel() == 0:
            return None
        (temp,) = params
        lse_n = segment_lse(_oriented(vn, dist.inverted) / temp, a2, B)
        losses = torch.logaddexp(lse_n[a1] - _oriented(vp, dist.inverted) / temp, torch.zeros_like(vp))
        return {"loss": Elements(losses, (a1, p), "pos_pair")}
    if name == "generalized_lifted_structure":
        pos_margin, neg_margin = params
        # PML: distance.margin(mat, pos_margin), distance.margin(neg_margin, mat), each set's LSE
        lp = _lse_or_zero(pos_margin - vp if dist.inverted else vp - pos_margin, a1, B)
        ln = _lse_or_zero(vn - neg_margin if dist.inverted else neg_margin - vn, a2, B)
        return {"loss": Elements(torch.relu(lp + ln), arange, "element")}
    if name == "tuplet_margin":
        if a1.numel() == 0 or a2.numel() == 0:
            return None
        margin, scale = params
        # cos(acos(s) - margin), with a finite derivative at s = 1 (docs/spec/pairwise.md)
        s = vp.clamp(-1, 1)
        c = s * math.cos(margin) + _safe_sqrt(1 - s * s) * math.sin(margin)
        lse_n = segment_lse(scale * vn, a2, B)
        return {"loss": Elements(_lse_with_zero(lse_n[a1] - scale * c), (a1, p), "pos_pair")}
    if name == "contrastive":
        pos_margin, neg_margin = params
        # PML: relu(distance.margin(d, pos_margin)), relu(distance.margin(neg_margin, d))
        lp = torch.relu(pos_margin - vp if dist.inverted else vp - pos_margin)
        ln = torch.relu(vn - neg_margin if dist.inverted else neg_margin - vn)
        return {"pos_loss": Elements(lp, (a1, p), "pos_pair"), "neg_loss": Elements(ln, (a2, n), "neg_pair")}
    raise NotImplementedError(f"the {name!r} loss has no pair-list form (add it to structloss_fast/pairwise/tuples.py)")


def pml_zero_rule(t: tuple, name: str) -> bool:
    """PML's pair losses (GenericPairLoss) return 0 when every list of the (pair) tuple holds at
    most one entry."""
    if SEMANTICS[name].tuples not in ("mask", "list"):
        return False
    return all(x.numel() <= 1 for x in to_pairs(t))

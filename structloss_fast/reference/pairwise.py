"""Pairwise losses, by definition (../shared/spec/pairwise.md).

Dense B x M matrices, plain autograd, in the input's dtype. Semantics are
pytorch-metric-learning's (CosineSimilarity on F.normalize'd embeddings, self-pairs excluded
when no references are given, Circle's alphas detached, AvgNonZeroReducer for "mean") with
one deliberate difference: a NaN row loss is kept by "mean" (PML's `loss > 0` filter drops it),
so that non-finite input gives a non-finite loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_similarity(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1, eps=1e-12) @ F.normalize(ref, p=2, dim=1, eps=1e-12).T


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool):
    """(positives, negatives) as B x M bool masks."""
    same = labels[:, None] == ref_labels[None, :]
    pos = same.clone()
    if exclude_self:
        pos.fill_diagonal_(False)
    return pos, ~same


def masked_logsumexp(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp over the masked entries; -inf for a row with none."""
    return a.masked_fill(~mask, float("-inf")).logsumexp(dim=1)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        counts = ~(rows <= 0)  # AvgNonZeroReducer, NaN kept
        return rows.sum() / counts.sum().clamp_min(1).to(rows.dtype)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _resolve_refs(embeddings, labels, ref_embeddings, ref_labels):
    if ref_embeddings is None:
        return embeddings, labels, True
    return ref_embeddings, ref_labels, False


def _twoset_loss(pos_logits, neg_logits, embeddings, labels, ref_embeddings, ref_labels, reduction):
    ref, ref_lab, exclude_self = _resolve_refs(embeddings, labels, ref_embeddings, ref_labels)
    s = cosine_similarity(embeddings, ref)
    pos, neg = pair_masks(labels, ref_lab, exclude_self)
    a = torch.where(pos, pos_logits(s), neg_logits(s))
    z = masked_logsumexp(a, pos) + masked_logsumexp(a, neg)
    valid = pos.any(dim=1) & neg.any(dim=1)
    rows = torch.where(valid, F.softplus(torch.where(valid, z, torch.zeros_like(z))), torch.zeros_like(z))
    return reduce_rows(rows, reduction)


def circle_loss(embeddings, labels, m=0.4, gamma=80.0, ref_embeddings=None, ref_labels=None, reduction="mean"):
    """Circle loss, pair-level labels (Sun et al. 2020, Eq. 6; PML's CircleLoss)."""
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m

    def pos_logits(s):
        return -gamma * torch.relu(op - s.detach()) * (s - delta_p)

    def neg_logits(s):
        return gamma * torch.relu(s.detach() - on) * (s - delta_n)

    return _twoset_loss(pos_logits, neg_logits, embeddings, labels, ref_embeddings, ref_labels, reduction)


def unified_loss(embeddings, labels, m=0.35, gamma=64.0, ref_embeddings=None, ref_labels=None, reduction="mean"):
    """The paper's unified loss (Eq. 1), pair-level: softplus(LSE_N gamma (s + m) + LSE_P (-gamma s))."""
    return _twoset_loss(
        lambda s: -gamma * s,
        lambda s: gamma * (s + m),
        embeddings,
        labels,
        ref_embeddings,
        ref_labels,
        reduction,
    )

"""Row-softmax losses, by definition (docs/spec/softmax.md).

Dense N x C tensors, plain autograd, in the input's dtype.

- Encouraging Loss (Zhao et al., AAAI 2022; the authors' EncouragingLoss):
  f_j = -log p_j + rho * b(p_j), b(p) = log(max(1 - p, eps)) for p <= LE and the tangent at LE
  above it, 1 - p = -expm1(log p). The row loss is (1 - ls) w_y f_y + (ls / C) sum_j w_j f_j
  (the authors' image-classification label smoothing, which is torch's at rho = 0); reductions
  and the "mean" denominator (sum of the target class weights over non-ignored rows) are
  F.cross_entropy's, except that an all-ignored (or zero-weight) batch gives 0, not NaN.
- Class-probability targets t (F.cross_entropy's second form, same shape as the logits): the
  row loss is sum_j w_j ((1 - ls) t_j + ls / C) f_j, the form label smoothing already has (at
  rho = 0, F.cross_entropy's); "mean" divides by the number of rows (0 for none).
- Margin heads: cos_j = x^ . w^_j, a logit transform (NormFace, CosFace, ArcFace, class-level
  Circle with detached alphas), then the loss above (cross-entropy at bonus_weight = 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flatten_rows(input: torch.Tensor, target: torch.Tensor):
    """(N, C, d1, ...) -> (N * d1 * ..., C) rows, like F.cross_entropy's K-dimensional case;
    class-probability targets (input's shape) are flattened alike. Also returns the shape of a
    "none" result."""
    probs = target.is_floating_point()
    if input.dim() == 1:
        return input.unsqueeze(0), target.reshape(1, -1) if probs else target.reshape(1), ()
    if input.dim() == 2:
        return input, target, (input.shape[0],)
    C = input.shape[1]
    rows = input.movedim(1, -1).reshape(-1, C)
    out_shape = (input.shape[0],) + tuple(input.shape[2:])
    if probs:
        return rows, target.movedim(1, -1).reshape(-1, C), out_shape
    return rows, target.reshape(-1), out_shape


def bonus(p: torch.Tensor, q: torch.Tensor, log_end: float, eps: float) -> torch.Tensor:
    """b(p) of the spec, from p and an accurate q = 1 - p."""
    b = torch.log(torch.clamp(q, min=eps))
    if log_end < 1.0:
        tangent = math.log1p(-log_end) - (p - log_end) / (1.0 - log_end)
        b = torch.where(p > log_end, tangent, b)
    return b


def class_losses(logits, *, log_end=0.75, bonus_weight=1.0, eps=1e-5):
    """f_j = -log p_j + rho b(p_j) of every class, (N, C)."""
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    q = -torch.expm1(logp)
    return -logp + bonus_weight * bonus(p, q, log_end, eps)


def row_losses(logits, target, *, log_end=0.75, bonus_weight=1.0, weight=None, ignore_index=-100,
               label_smoothing=0.0, eps=1e-5):
    """Unreduced EL of (N, C) logits for class indices (N,) or class probabilities (N, C):
    (row losses (N,), what each row adds to the "mean" denominator (N,))."""
    N, C = logits.shape
    f = class_losses(logits, log_end=log_end, bonus_weight=bonus_weight, eps=eps)  # (N, C): each class's loss
    w = torch.ones(C, dtype=logits.dtype, device=logits.device) if weight is None else weight.to(logits.dtype)
    if target.is_floating_point():
        c = w * ((1.0 - label_smoothing) * target.to(logits.dtype) + label_smoothing / C)
        return (c * f).sum(dim=1), torch.ones(N, dtype=logits.dtype, device=logits.device)
    target = target.long()  # any integer dtype (a uint8 tensor would index as a mask)
    ignored = target == ignore_index
    safe_target = torch.where(ignored, torch.zeros_like(target), target)
    w_y = w[safe_target]
    loss = (1.0 - label_smoothing) * w_y * f.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing > 0:
        loss = loss + (label_smoothing / C) * (f * w).sum(dim=1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(ignored, zero, loss), torch.where(ignored, zero, w_y)


def reduce(rows, w_y, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        denom = w_y.sum()
        return rows.sum() / torch.where(denom == 0, torch.ones_like(denom), denom)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def encouraging_loss(input, target, *, log_end=0.75, bonus_weight=1.0, weight=None, ignore_index=-100,
                     reduction="mean", label_smoothing=0.0, eps=1e-5):
    """Encouraging Loss with F.cross_entropy's interface (class indices or class probabilities)."""
    rows, tgt, out_shape = flatten_rows(input, target)
    losses, w_y = row_losses(rows, tgt, log_end=log_end, bonus_weight=bonus_weight, weight=weight,
                             ignore_index=ignore_index, label_smoothing=label_smoothing, eps=eps)
    out = reduce(losses, w_y, reduction)
    if reduction == "none":
        out = out.reshape(out_shape)
    return out


# ---------------------------------------------------------------- margin heads


def cosine_logits(embeddings, class_weight):
    """cos_j = x^ . w^_j, (N, C); class_weight is (C, D) like nn.Linear's weight."""
    return F.normalize(embeddings, p=2, dim=1, eps=1e-12) @ F.normalize(class_weight, p=2, dim=1, eps=1e-12).T


def margin_logits(cos, target, kind, t0, t1, ignore_index=-100):
    """The heads' logit transforms of the spec; the target class gets its own formula."""
    target = target.long()
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, torch.zeros_like(target)), cos.shape[1]).bool() & valid[:, None]
    if kind == "normface":
        return t0 * cos
    if kind == "cosface":
        return t0 * (cos - t1 * onehot.to(cos.dtype))
    if kind == "arcface":
        theta = torch.acos(torch.clamp(cos, -1.0, 1.0))
        target_logit = torch.where(theta <= math.pi - t1, torch.cos(theta + t1), cos - t1 * math.sin(t1))
        return t0 * torch.where(onehot, target_logit, cos)
    if kind == "circle":
        gamma, m = t0, t1
        alpha_p = torch.relu(1 + m - cos.detach())
        alpha_n = torch.relu(cos.detach() + m)
        pos = gamma * alpha_p * (cos - (1 - m))
        neg = gamma * alpha_n * (cos - m)
        return torch.where(onehot, pos, neg)
    raise ValueError(f"unknown margin head {kind!r}")


def pool_cosines(cos, pool, group, param):
    """(N, C K) similarities to the centers (class c: columns c K .. c K + K - 1) -> (N, C): the
    maximum over each class's centers ("max", SubCenterArcFace) or their soft average
    sum_k softmax_k(param s_ck) s_ck ("soft_avg", SoftTriple with param = 1 / gamma)."""
    s = cos.view(cos.shape[0], cos.shape[1] // group, group)
    if pool == "max":
        return s.max(dim=2).values
    return (torch.softmax(s * param, dim=2) * s).sum(dim=2)


def margin_loss(kind, embeddings, class_weight, labels, t0, t1, *, log_end=1.0, bonus_weight=0.0, weight=None,
                ignore_index=-100, reduction="mean", label_smoothing=0.0, eps=1e-5, pool=None):
    """pool: None, or (pool, group, param) of pool_cosines for heads with several centers per class."""
    cos = cosine_logits(embeddings, class_weight)
    if pool is not None:
        cos = pool_cosines(cos, *pool)
    logits = margin_logits(cos, labels, kind, t0, t1, ignore_index)
    return encouraging_loss(logits, labels, log_end=log_end, bonus_weight=bonus_weight, weight=weight,
                            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, eps=eps)


def linear_encouraging_loss(input, linear_weight, target, linear_bias=None, **kwargs):
    """EL of input @ linear_weight^T + linear_bias, dense."""
    return encouraging_loss(F.linear(input, linear_weight, linear_bias), target, **kwargs)


# ---------------------------------------------------------------- proxy losses


def proxy_nca_loss(embeddings, proxies, labels, softmax_scale=1.0, reduction="mean"):
    """ProxyNCA (Movshovitz-Attias et al. 2017; PML's ProxyNCALoss: squared Euclidean distances
    of the normalized embeddings and proxies): -log softmax_j(-softmax_scale d2_ij) at the label,
    over the rows whose probability is not 0 in the input's dtype (PML drops the others);
    "mean" over those rows."""
    d2 = 2 - 2 * cosine_logits(embeddings, proxies)
    logp = torch.log_softmax(-softmax_scale * d2, dim=1).gather(1, labels[:, None]).squeeze(1)
    keep = logp.detach().exp() != 0
    rows = torch.where(keep, -logp, torch.zeros_like(logp))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp_min(1).to(rows.dtype)


def proxy_anchor_terms(embeddings, proxies, labels, margin=0.1, alpha=32.0):
    """ProxyAnchor's per-proxy terms (Kim et al. 2020; PML's ProxyAnchorLoss, cosine similarity):
    pos_c = log(1 + sum_{i: y_i = c} exp(-alpha (s_ic - margin))), neg_c = log(1 + sum_{i: y_i != c}
    exp(alpha (s_ic + margin))), each 0 without such rows; and the number of proxies with rows."""
    cos = cosine_logits(embeddings, proxies)
    pos = F.one_hot(labels, proxies.shape[0]).bool()

    def lse1(a, mask):  # log(1 + sum over the mask of e^a); 0 for an empty mask (PML's logsumexp)
        a = torch.cat([a.masked_fill(~mask, float("-inf")), a.new_zeros(1, a.shape[1])], dim=0)  # (also for 0 rows)
        return torch.where(mask.any(dim=0), torch.logsumexp(a, dim=0), torch.zeros_like(a[0]))

    return lse1(-alpha * (cos - margin), pos), lse1(alpha * (cos + margin), ~pos), pos.any(dim=0).sum()


def proxy_anchor_loss(embeddings, proxies, labels, margin=0.1, alpha=32.0, reduction="mean"):
    """sum_c pos_c / (proxies with rows) + sum_c neg_c / C (PML's two DivisorReducers; a zero
    divisor gives 0); "sum" adds the terms, "none" returns pos_c + neg_c per proxy (C,)."""
    pos, neg, n_with = proxy_anchor_terms(embeddings, proxies, labels, margin, alpha)
    if reduction == "none":
        return pos + neg
    if reduction == "sum":
        return pos.sum() + neg.sum()
    pos_part = torch.where(n_with > 0, pos.sum() / n_with.clamp_min(1).to(pos.dtype), torch.zeros_like(pos.sum()))
    return pos_part + neg.sum() / proxies.shape[0]

"""SEAL: structured energy networks as losses, by definition (docs/spec/seal.md).

Sign convention: the networks compute a *score* s(x, y) = -E(x, y) (higher is better), as the
authors' code does. With unary potentials u = T(x) B^T (B, L) (feature net T, label embeddings
B), the global MLP (C1 = global_weight (H, L), b1 = global_bias (H,), c2 = global_out (H,)):

    s_local(x, y)  = sum_i y_i u_i
    s_global(y)    = c2^T softplus(C1 y + b1)
    s(x, y)        = s_local + s_global

Dense, plain autograd, in the inputs' dtype. Tests and benchmarks compare the fused kernels
against these functions, and `philox_bernoulli` reproduces the kernels' samples bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- scores


def local_score(unary: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i y_i u_i. unary (B, L); y (B, L) -> (B,) or (B, K, L) -> (B, K)."""
    if y.dim() == 3:
        return (y * unary.unsqueeze(1)).sum(-1)
    return (y * unary).sum(-1)


def global_score(y: torch.Tensor, global_weight: torch.Tensor, global_bias: torch.Tensor,
                 global_out: torch.Tensor) -> torch.Tensor:
    """c2^T softplus(C1 y + b1) over the last dimension of y (torch's Softplus, threshold 20)."""
    return F.softplus(F.linear(y, global_weight, global_bias)) @ global_out


def score(unary, y, global_weight, global_bias, global_out) -> torch.Tensor:
    return local_score(unary, y) + global_score(y, global_weight, global_bias, global_out)


def log_q(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log q(y) = -sum_l BCE(p_l, y_l), each log clamped at -100 as torch's BCELoss does.
    probs (B, L); y (B, L) or (B, K, L)."""
    p = probs.unsqueeze(1) if y.dim() == 3 else probs
    # Written out (F.binary_cross_entropy raises on NaN, which must give a NaN loss instead);
    # tests check it against F.binary_cross_entropy.
    return (y * torch.log(p).clamp_min(-100) + (1 - y) * torch.log1p(-p).clamp_min(-100)).sum(-1)


# ---------------------------------------------------------------- losses


def reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean() if rows.numel() else rows.sum() * float("nan")
    raise ValueError(reduction)


def nce_ranking_loss(unary, probs, labels, samples, global_weight, global_bias, global_out, *,
                     use_logq: bool = True, reduction: str = "sum") -> torch.Tensor:
    """Noise-contrastive ranking loss on given samples (B, K, L), gold y* = labels at index 0:
    z_k = s(x, y_k) - log q(y_k); loss_b = -z_0 + LSE_{k=0..K} z_k. use_logq=False is the
    "ranking" variant (z_k = s(x, y_k)). probs is a constant (no gradient flows into it)."""
    probs = probs.detach()
    y = torch.cat([labels.unsqueeze(1).to(samples.dtype), samples], dim=1)  # (B, K+1, L)
    z = score(unary, y, global_weight, global_bias, global_out)
    if use_logq:
        z = z - log_q(probs, y)
    # 0 * sum(p): NaN for a NaN probability, so that it reaches the loss in the ranking variant
    # too (there p only decides the samples); exactly 0 otherwise.
    z = z + 0.0 * probs.sum(-1, keepdim=True)
    rows = torch.logsumexp(z, dim=1) - z[:, 0]
    return reduce(rows, reduction)


def soft_f1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 sum min(a, b) / (sum min(a, b) + sum max(a, b)) over the last dimension; 1 for two
    all-zero vectors (0 / 0: identical empty label sets)."""
    mn = torch.minimum(a, b).sum(-1)
    mx = torch.maximum(a, b).sum(-1)
    den = mn + mx
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, 2 * mn / safe, torch.ones_like(den))


def regression_loss(scores: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, *,
                    reduction: str = "mean") -> torch.Tensor:
    """DVN-style regression: BCEWithLogits(s(x, p), F1_soft(p, y*)), scores = s(x, p) (B,)."""
    target = soft_f1(probs, labels.to(probs.dtype))
    rows = F.binary_cross_entropy_with_logits(scores, target.to(scores.dtype), reduction="none")
    return reduce(rows, reduction)


def manhattan_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the labels."""
    return (a - b).abs().mean(-1)


def soft_f1_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - soft_f1(a, b)


def margin_loss(score_gold, score_cost_augmented, delta, score_prediction=None, *, lambda_p: float = 0.0,
                reduction: str = "mean") -> torch.Tensor:
    """Margin-rescaled, zero-truncated: relu(Delta(y_ca, y*) - s(y*) + s(y_ca))
    + lambda_p relu(s(y^) - s(y*)); all scores (B,), delta = Delta(y_ca, y*) (B,)."""
    rows = torch.relu(delta - score_gold + score_cost_augmented)
    if score_prediction is not None and lambda_p != 0:
        rows = rows + lambda_p * torch.relu(score_prediction - score_gold)
    return reduce(rows, reduction)


def task_loss(logits, labels, score_of_probs, *, weight: float, variant: str = "score",
              reduction: str = "mean") -> torch.Tensor:
    """L_F = w * (-s(x, sigmoid(F(x)))) + sum_l BCEWithLogits(F(x)_l, y_l) per example;
    variant "regression" uses -sigmoid(s) for the energy term."""
    energy_term = -torch.sigmoid(score_of_probs) if variant == "regression" else -score_of_probs
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").sum(-1)
    return reduce(weight * energy_term + bce, reduction)


# ---------------------------------------------------------------- the samples of the fused kernels
#
# Philox4x32-10 (Salmon et al., SC'11), the generator of ATen's at::Philox4_32 and of Triton's
# tl.randint4x: key = the 64-bit seed (low word, high word). With J = ceil(L / 4), label l of
# sample k of example b is output word (l div J) of the call with counter (l mod J, k, b_lo, b_hi),
# which is at::Philox4_32(seed, /*subsequence=*/b, /*offset=*/(k << 32) + (l mod J)). A label is on when
# (word >> 8) * 2^-24 < p: a 24-bit uniform, exact in every float dtype, so all backends agree bit
# for bit; P(on) = ceil(p * 2^24) / 2^24, within 6e-8 of p.

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int):
    """(hi, lo) words of a * m for 32-bit a (int64 tensor) and constant m, without int64 overflow."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo                      # < 2^48
    p_hi = a * m_hi                      # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16     # floor(a * m / 2^32)
    lo = ((p_hi & 0xFFFF) << 16) + p_lo
    return hi & MASK32, lo & MASK32


def philox4x32(c0, c1, c2, c3, seed, rounds: int = 10):
    """Philox4x32-10 on int64 tensors of 32-bit counter words; returns the 4 output words. The
    seed is an int or an int64 tensor (read on its device, never copied to the host)."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_uniform24(batch: int, num_samples: int, num_labels: int, seed, device=None) -> torch.Tensor:
    """The kernels' uniforms: (B, K, L) int64 values in [0, 2^24). seed: an int, or the kernels'
    seed tensor (int64, one element: its two's-complement bits are the 64-bit key)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        seed = int(seed) & ((1 << 64) - 1)
    J = (num_labels + 3) // 4
    b = torch.arange(batch, dtype=torch.int64, device=device).view(-1, 1, 1)
    k = torch.arange(num_samples, dtype=torch.int64, device=device).view(1, -1, 1)
    j = torch.arange(J, dtype=torch.int64, device=device).view(1, 1, -1)
    shape = (batch, num_samples, J)
    words = philox4x32(j.expand(shape), k.expand(shape), (b & MASK32).expand(shape), (b >> 32).expand(shape), seed)
    out = torch.cat(words, dim=-1)[..., :num_labels]  # label l: word l // J of call l % J
    return out >> 8


def philox_bernoulli(probs: torch.Tensor, num_samples: int, seed) -> torch.Tensor:
    """The samples the fused kernels draw for this seed (an int or the kernels' seed tensor):
    (B, K, L) in probs' dtype."""
    B, L = probs.shape
    u = philox_uniform24(B, num_samples, L, seed, device=probs.device)
    # u * 2^-24 is exact in every float dtype; compare in float64 to keep p exact too.
    uniform = u.to(torch.float64) * 2.0 ** -24
    return (uniform < probs.detach().to(torch.float64).unsqueeze(1)).to(probs.dtype)


def seed_value(seed: torch.Tensor) -> int:
    """The 64-bit seed held by the kernels' seed tensor (int64, one element), as an unsigned int."""
    return int(seed.reshape(-1)[0].item()) & ((1 << 64) - 1)

"""Triton kernels of the fused pairwise engine (flash-attention style, no B x M matrix).

Forward: one program per block of anchor rows walks all reference tiles, forms S = X R^T on
the fly (fp32 accumulation, bf16/fp16 tensor-core inputs) and keeps online (max, sum-exp)
statistics for the positive and the negative set; it writes 3 numbers per row.
Backward: two kernels that recompute the tiles, so neither needs atomics and the result is
deterministic: one over row blocks (dX += G R), one over reference blocks (dR += G^T X).
The same code runs on CPU tensors under TRITON_INTERPRET=1, which is how it is tested here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest embedding size the kernels hold in one tile (the gradient accumulators span D).
MAX_D = 2048


@triton.jit
def _pair_logits(s, same, LOSS: tl.constexpr, p0, p1):
    """Logit a(s) and its derivative da/ds (Circle's alphas detached); p0 = m, p1 = gamma."""
    if LOSS == 0:  # Circle: O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m
        w_pos = tl.maximum(1.0 + p0 - s, 0.0)
        w_neg = tl.maximum(s + p0, 0.0)
        a = tl.where(same, -p1 * w_pos * (s - (1.0 - p0)), p1 * w_neg * (s - p0))
        da = tl.where(same, -p1 * w_pos, p1 * w_neg)
    else:  # unified loss: -gamma s for positives, gamma (s + m) for negatives
        a = tl.where(same, -p1 * s, p1 * (s + p0))
        da = tl.where(same, -p1 + 0.0 * s, p1 + 0.0 * s)
    return a, da


@triton.jit
def _softplus(z):
    # torch's Softplus(threshold=20); exp(z) below -15, where log(1 + e) rounds e away.
    e = tl.exp(tl.where(z > 20.0, 20.0, z))  # a NaN z stays NaN (tl.minimum would drop it)
    return tl.where(z > 20.0, z, tl.where(z < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _softplus_grad(z):
    e = tl.exp(tl.where(z > 20.0, 20.0, z))
    return tl.where(z > 20.0, 1.0, e / (e + 1.0))


@triton.jit
def _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              ACC: tl.constexpr, UPCAST: tl.constexpr):
    ks = tl.arange(0, BLOCK_D)
    k_ok = ks < D
    xt = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    rt = tl.load(R + cols[:, None] * stride_r + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    if UPCAST:
        xt = xt.to(tl.float32)
        rt = rt.to(tl.float32)
    s = tl.dot(xt, tl.trans(rt), input_precision=PRECISION, out_dtype=ACC)
    return s, xt, rt


@triton.jit
def _pairwise_fwd_kernel(X, R, LAB, RLAB, STATS, B, M, D, stride_x, stride_r, p0, p1,
                         EXCLUDE_SELF: tl.constexpr, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    m_p = tl.full((BLOCK_M,), float("-inf"), ACC)
    m_n = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_p = tl.zeros((BLOCK_M,), ACC)
    l_n = tl.zeros((BLOCK_M,), ACC)
    c_p = tl.zeros((BLOCK_M,), tl.int32)
    c_n = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        s, _, _ = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        rlab = tl.load(RLAB + cols, mask=col_ok, other=0)
        same = lab[:, None] == rlab[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        pos = same & valid
        if EXCLUDE_SELF:
            pos = pos & (rows[:, None] != cols[None, :])
        neg = (~same) & valid
        a, _ = _pair_logits(s, same, LOSS, p0, p1)
        a_p = tl.where(pos, a, float("-inf"))
        a_n = tl.where(neg, a, float("-inf"))
        mp_new = tl.maximum(m_p, tl.max(a_p, 1))
        mn_new = tl.maximum(m_n, tl.max(a_n, 1))
        mp_safe = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        mn_safe = tl.where(mn_new == float("-inf"), 0.0, mn_new)
        l_p = l_p * tl.exp(m_p - mp_safe) + tl.sum(tl.exp(tl.where(pos, a - mp_safe[:, None], float("-inf"))), 1)
        l_n = l_n * tl.exp(m_n - mn_safe) + tl.sum(tl.exp(tl.where(neg, a - mn_safe[:, None], float("-inf"))), 1)
        m_p = mp_new
        m_n = mn_new
        c_p += tl.sum(pos.to(tl.int32), 1)
        c_n += tl.sum(neg.to(tl.int32), 1)
    lse_p = tl.where(c_p > 0, m_p + tl.log(tl.where(c_p > 0, l_p, 1.0)), float("-inf"))
    lse_n = tl.where(c_n > 0, m_n + tl.log(tl.where(c_n > 0, l_n, 1.0)), float("-inf"))
    has_both = (c_p > 0) & (c_n > 0)
    loss = tl.where(has_both, _softplus(tl.where(has_both, lse_p + lse_n, 0.0)), 0.0)
    tl.store(STATS + rows * 3 + 0, lse_p, mask=row_ok)
    tl.store(STATS + rows * 3 + 1, lse_n, mask=row_ok)
    tl.store(STATS + rows * 3 + 2, loss, mask=row_ok)


@triton.jit
def _grad_tile(s, same, pos, neg, lse_p, lse_n, coef, LOSS: tl.constexpr, p0, p1):
    a, da = _pair_logits(s, same, LOSS, p0, p1)
    lse = tl.where(same, lse_p[:, None], lse_n[:, None])
    e = tl.exp(tl.where(pos | neg, a - lse, float("-inf")))
    return tl.where(pos | neg, coef[:, None] * e * da, 0.0)


@triton.jit
def _row_coef(STATS, W, rows, row_ok):
    lse_p = tl.load(STATS + rows * 3 + 0, mask=row_ok, other=float("-inf"))
    lse_n = tl.load(STATS + rows * 3 + 1, mask=row_ok, other=float("-inf"))
    loss = tl.load(STATS + rows * 3 + 2, mask=row_ok, other=0.0)
    w = tl.load(W + rows, mask=row_ok, other=0.0)
    counts = ~(loss <= 0.0)
    z = tl.where(counts, lse_p + lse_n, 0.0)
    coef = tl.where(counts & (w != 0.0), w * _softplus_grad(z), 0.0)
    return lse_p, lse_n, coef


@triton.jit
def _pairwise_bwd_rows_kernel(X, R, LAB, RLAB, STATS, W, DX, B, M, D, stride_x, stride_r, p0, p1,
                              EXCLUDE_SELF: tl.constexpr, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DX[rows] = sum over reference tiles of G[rows, cols] @ R[cols]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    lse_p, lse_n, coef = _row_coef(STATS, W, rows, row_ok)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        s, _, rt = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        rlab = tl.load(RLAB + cols, mask=col_ok, other=0)
        same = lab[:, None] == rlab[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        pos = same & valid
        if EXCLUDE_SELF:
            pos = pos & (rows[:, None] != cols[None, :])
        neg = (~same) & valid
        g = _grad_tile(s, same, pos, neg, lse_p, lse_n, coef, LOSS, p0, p1)
        acc += tl.dot(g.to(rt.dtype), rt, input_precision=PRECISION, out_dtype=ACC)
    ks = tl.arange(0, BLOCK_D)
    tl.store(DX + rows[:, None] * D + ks[None, :], acc, mask=row_ok[:, None] & (ks[None, :] < D))


@triton.jit
def _pairwise_bwd_cols_kernel(X, R, LAB, RLAB, STATS, W, DR, B, M, D, stride_x, stride_r, p0, p1,
                              EXCLUDE_SELF: tl.constexpr, ACCUMULATE: tl.constexpr, LOSS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DR[cols] (+)= sum over anchor blocks of G[rows, cols]^T @ X[rows]."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    rlab = tl.load(RLAB + cols, mask=col_ok, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        lab = tl.load(LAB + rows, mask=row_ok, other=0)
        lse_p, lse_n, coef = _row_coef(STATS, W, rows, row_ok)
        s, xt, _ = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        same = lab[:, None] == rlab[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        pos = same & valid
        if EXCLUDE_SELF:
            pos = pos & (rows[:, None] != cols[None, :])
        neg = (~same) & valid
        g = _grad_tile(s, same, pos, neg, lse_p, lse_n, coef, LOSS, p0, p1)
        acc += tl.dot(tl.trans(g.to(xt.dtype)), xt, input_precision=PRECISION, out_dtype=ACC)
    ks = tl.arange(0, BLOCK_D)
    out_mask = col_ok[:, None] & (ks[None, :] < D)
    ptrs = DR + cols[:, None] * D + ks[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=out_mask, other=0.0)
    tl.store(ptrs, acc, mask=out_mask)


def _config(D: int, dtype: torch.dtype, device: torch.device):
    block_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":  # interpreter: few, small programs
        return 16, 16, block_d, 4
    if dtype == torch.float64:
        return 16, 32, block_d, 4
    if block_d <= 128:
        return 64, 64, block_d, 4
    if block_d <= 256:
        return 64, 32, block_d, 8
    if block_d <= 512:
        return 32, 32, block_d, 8
    return 16, 32, block_d, 8


def _precision(dtype):
    # fp32 inputs: full-precision products, as torch.mm does (no TF32) by default.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _upcast(x):
    # Triton 3.8's interpreter computes tl.dot on bfloat16 tiles wrongly (fp16 is fine):
    # under the interpreter, bf16 tiles are widened to fp32 before the products.
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_supported(x: torch.Tensor) -> str | None:
    """None when the kernels take x, else the reason."""
    if x.shape[1] > MAX_D:
        return f"the Triton pairwise kernels hold the embedding in one tile and take D <= {MAX_D}, got D={x.shape[1]}"
    return None


def forward_row_stats(x, labels, ref, ref_labels, exclude_self: bool, loss: int, params) -> torch.Tensor:
    """(B, 3) row statistics (lse_pos, lse_neg, row_loss) in float32 (float64 for float64 x)."""
    B, D = x.shape
    M = ref.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = torch.empty((B, 3), dtype=stat_dtype, device=x.device)
    if B == 0:
        return stats
    if M == 0:
        stats[:, :2] = float("-inf")
        stats[:, 2] = 0
        return stats
    bm, bn, bd, warps = _config(D, x.dtype, x.device)
    grid = (triton.cdiv(B, bm),)
    _pairwise_fwd_kernel[grid](
        x, ref, labels, ref_labels, stats, B, M, D, x.stride(0), ref.stride(0), float(params[0]), float(params[1]),
        EXCLUDE_SELF=exclude_self, LOSS=loss, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        PRECISION=_precision(x.dtype), ACC=_acc(x.dtype), UPCAST=_upcast(x), num_warps=warps,
    )
    return stats


def backward(x, labels, ref, ref_labels, row_stats, row_weights, exclude_self: bool, loss: int, params):
    """(grad_x, grad_ref) in float32 (float64 for float64 x); grad_ref is empty with exclude_self."""
    B, D = x.shape
    M = ref.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.zeros((B, D), dtype=acc_dtype, device=x.device)
    grad_ref = torch.zeros((0 if exclude_self else M, D), dtype=acc_dtype, device=x.device)
    if B == 0 or M == 0:
        return grad_x, grad_ref
    row_stats = row_stats.to(acc_dtype).contiguous()
    row_weights = row_weights.to(acc_dtype).contiguous()
    bm, bn, bd, warps = _config(D, x.dtype, x.device)
    common = dict(LOSS=loss, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(x.dtype), ACC=_acc(x.dtype), UPCAST=_upcast(x), num_warps=warps)
    args = (x, ref, labels, ref_labels, row_stats, row_weights)
    scalars = (B, M, D, x.stride(0), ref.stride(0), float(params[0]), float(params[1]))
    _pairwise_bwd_rows_kernel[(triton.cdiv(B, bm),)](*args, grad_x, *scalars, EXCLUDE_SELF=exclude_self, **common)
    target = grad_x if exclude_self else grad_ref
    _pairwise_bwd_cols_kernel[(triton.cdiv(M, bn),)](
        *args, target, *scalars, EXCLUDE_SELF=exclude_self, ACCUMULATE=exclude_self, **common
    )
    return grad_x, grad_ref

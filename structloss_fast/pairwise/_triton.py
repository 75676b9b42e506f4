"""Triton kernels of the fused pairwise engine (flash-attention style, no B x M matrix).

Forward: one program per block of anchor rows walks all reference tiles, forms S = X R^T on
the fly (fp32 accumulation, bf16/fp16 tensor-core inputs) and keeps online per-row statistics
(running max and sum-exp per set, sums, counts, arg-extrema); it writes the engine's 8 row
statistics (PairStat, csrc/common/ids.h). NT-Xent needs a second sweep once the
negatives' log-sum-exp is known. Backward: two kernels that recompute the tiles, so neither
needs atomics and the result is deterministic: one over row blocks (dX += G R), one over
reference blocks (dR += G^T X). Triplet loss over all triplets needs per-anchor sorted
distance lists and has no Triton kernel (the compiled CUDA backend covers it).
The same code runs on CPU tensors under TRITON_INTERPRET=1, which is how it is tested here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ids import PAIR_LOSS_INFO, PairGradMode, PairLoss, PairStat

# Largest embedding size the kernels hold in one tile (the gradient accumulators span D).
MAX_D = 2048
SUPPORTED = (PairLoss.CIRCLE, PairLoss.UNIFIED, PairLoss.MULTI_SIMILARITY, PairLoss.SUP_CON, PairLoss.NT_XENT,
             PairLoss.CONTRASTIVE, PairLoss.TRIPLET_HARD)
# Why the others have no kernel here ("auto" then takes the CUDA backend's strip engine).
_UNSUPPORTED_WHY = {
    PairLoss.TRIPLET_ALL: "triplet loss over all triplets has no Triton kernel (it needs per-anchor sorted distances)",
}

# The ids of csrc/common/ids.h as compile-time constants of the kernels.
CIRCLE: tl.constexpr = tl.constexpr(int(PairLoss.CIRCLE))
UNIFIED: tl.constexpr = tl.constexpr(int(PairLoss.UNIFIED))
MULTI_SIMILARITY: tl.constexpr = tl.constexpr(int(PairLoss.MULTI_SIMILARITY))
SUP_CON: tl.constexpr = tl.constexpr(int(PairLoss.SUP_CON))
NT_XENT: tl.constexpr = tl.constexpr(int(PairLoss.NT_XENT))
CONTRASTIVE: tl.constexpr = tl.constexpr(int(PairLoss.CONTRASTIVE))
TRIPLET_HARD: tl.constexpr = tl.constexpr(int(PairLoss.TRIPLET_HARD))
NUM_STATS: tl.constexpr = tl.constexpr(len(PairStat))
ST_AUX0: tl.constexpr = tl.constexpr(int(PairStat.AUX0))
ST_AUX1: tl.constexpr = tl.constexpr(int(PairStat.AUX1))
ST_SUM0: tl.constexpr = tl.constexpr(int(PairStat.SUM0))
ST_COUNT0: tl.constexpr = tl.constexpr(int(PairStat.COUNT0))
ST_SUM1: tl.constexpr = tl.constexpr(int(PairStat.SUM1))
ST_COUNT1: tl.constexpr = tl.constexpr(int(PairStat.COUNT1))
ST_NUM_POS: tl.constexpr = tl.constexpr(int(PairStat.NUM_POS))
ST_NUM_NEG: tl.constexpr = tl.constexpr(int(PairStat.NUM_NEG))


@triton.jit
def _pair_logits(s, same, LOSS: tl.constexpr, p0, p1, p2):
    """Two-set logits a(s) and da/ds (Circle's alphas detached)."""
    if LOSS == CIRCLE:  # p0 = m, p1 = gamma
        w_pos = tl.maximum(1.0 + p0 - s, 0.0)
        w_neg = tl.maximum(s + p0, 0.0)
        a = tl.where(same, -p1 * w_pos * (s - (1.0 - p0)), p1 * w_neg * (s - p0))
        da = tl.where(same, -p1 * w_pos, p1 * w_neg)
    elif LOSS == UNIFIED:  # p0 = m, p1 = gamma
        a = tl.where(same, -p1 * s, p1 * (s + p0))
        da = tl.where(same, -p1 + 0.0 * s, p1 + 0.0 * s)
    else:  # multi-similarity: p0 = alpha, p1 = beta, p2 = base
        a = tl.where(same, p0 * (p2 - s), p1 * (s - p2))
        da = tl.where(same, -p0 + 0.0 * s, p1 + 0.0 * s)
    return a, da


@triton.jit
def _softplus20(z):
    # torch.nn.Softplus (threshold 20); exp(z) below -15, where log(1 + e) rounds e away.
    e = tl.exp(tl.where(z > 20.0, 20.0, z))  # a NaN z stays NaN (tl.minimum would drop it)
    return tl.where(z > 20.0, z, tl.where(z < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _softplus20_grad(z):
    e = tl.exp(tl.where(z > 20.0, 20.0, z))
    return tl.where(z > 20.0, 1.0, e / (e + 1.0))


@triton.jit
def _softplus_exact(z):
    """log(1 + e^z) for any z (0 at -inf)."""
    az = tl.where(z < 0.0, -z, z)
    e = tl.exp(-az)
    return tl.where(z > 0.0, z, 0.0) + tl.where(e < 1e-7, e, tl.log(1.0 + e))


@triton.jit
def _sigmoid(z):
    e = tl.exp(tl.where(z < 0.0, z, -z))
    return tl.where(z < 0.0, e / (1.0 + e), 1.0 / (1.0 + e))


@triton.jit
def _unit_distance(s):
    sq = 2.0 - 2.0 * s
    return tl.sqrt(tl.where(sq < 0.0, 0.0, sq))


@triton.jit
def _unit_distance_grad(d):
    return tl.where(d > 0.0, -1.0 / tl.where(d > 0.0, d, 1.0), tl.where(d != d, d, 0.0))


@triton.jit
def _relu_grad(x):
    return tl.where(x > 0.0, 1.0, tl.where(x != x, x, 0.0))


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
def _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET):
    rlab = tl.load(RLAB + cols, mask=col_ok, other=0)
    same = lab[:, None] == rlab[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    pos = same & valid
    if SELF_OFFSET >= 0:
        pos = pos & (((rows + SELF_OFFSET) % M)[:, None] != cols[None, :])
    neg = (~same) & valid
    return same, pos, neg


@triton.jit
def _online_lse(m_old, l_old, a, mask):
    """Merge a tile's masked logits into a running (max, sum-exp)."""
    m_new = tl.maximum(m_old, tl.max(tl.where(mask, a, float("-inf")), 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l_old * tl.exp(m_old - m_safe) + tl.sum(tl.exp(tl.where(mask, a - m_safe[:, None], float("-inf"))), 1)
    return m_new, l_new


@triton.jit
def _finish_lse(m, l, count):
    return tl.where(count > 0, m + tl.log(tl.where(count > 0, l, 1.0)), float("-inf"))


@triton.jit
def _pairwise_fwd_kernel(X, R, LAB, RLAB, STATS, B, M, D, stride_x, stride_r, p0, p1, p2, SELF_OFFSET,
                         LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    zero = tl.zeros((BLOCK_M,), ACC)
    m_p = zero + float("-inf")
    m_n = zero + float("-inf")
    l_p = zero
    l_n = zero
    acc0 = zero  # loss-specific accumulators
    acc1 = zero
    acc2 = zero
    acc3 = zero
    c_p = tl.zeros((BLOCK_M,), tl.int32)
    c_n = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        s, _, _ = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
        c_p += tl.sum(pos.to(tl.int32), 1)
        c_n += tl.sum(neg.to(tl.int32), 1)
        if LOSS == CIRCLE or LOSS == UNIFIED or LOSS == MULTI_SIMILARITY:  # two-set
            a, _ = _pair_logits(s, same, LOSS, p0, p1, p2)
            m_p, l_p = _online_lse(m_p, l_p, a, pos)
            m_n, l_n = _online_lse(m_n, l_n, a, neg)
        elif LOSS == SUP_CON:  # LSE over positives and negatives, sum of positive logits
            a = s / p0
            m_p, l_p = _online_lse(m_p, l_p, a, pos | neg)
            acc0 += tl.sum(tl.where(pos, a, 0.0), 1)
        elif LOSS == NT_XENT:  # sweep 1: LSE over negatives
            a = s / p0
            m_n, l_n = _online_lse(m_n, l_n, a, neg)
        elif LOSS == CONTRASTIVE:  # sums and non-zero counts of both pair losses
            d = _unit_distance(s)
            lp = tl.maximum(d - p0, 0.0)
            ln = tl.maximum(p1 - d, 0.0)
            lp = tl.where(d != d, d, lp)
            ln = tl.where(d != d, d, ln)
            acc0 += tl.sum(tl.where(pos, lp, 0.0), 1)
            acc1 += tl.sum(tl.where(pos & ~(lp <= 0.0), 1.0, 0.0), 1)
            acc2 += tl.sum(tl.where(neg, ln, 0.0), 1)
            acc3 += tl.sum(tl.where(neg & ~(ln <= 0.0), 1.0, 0.0), 1)
        else:  # batch-hard triplets: largest positive distance, smallest negative distance, first index
            d = _unit_distance(s)
            colf = cols.to(ACC)[None, :] + zero[:, None]
            tp = tl.max(tl.where(pos, d, float("-inf")), 1)
            ip = tl.min(tl.where(pos & (d == tp[:, None]), colf, float("inf")), 1)
            better = (tp > m_p) | ((acc0 == 0.0) & (tl.sum(pos.to(tl.int32), 1) > 0))
            m_p = tl.where(better, tp, m_p)
            acc1 = tl.where(better, ip, acc1)
            acc0 = tl.where(tl.sum(pos.to(tl.int32), 1) > 0, 1.0, acc0)
            tn = tl.min(tl.where(neg, d, float("inf")), 1)
            i_n = tl.min(tl.where(neg & (d == tn[:, None]), colf, float("inf")), 1)
            better_n = (tn < m_n) | ((acc2 == 0.0) & (tl.sum(neg.to(tl.int32), 1) > 0))
            m_n = tl.where(better_n, tn, m_n)
            acc3 = tl.where(better_n, i_n, acc3)
            acc2 = tl.where(tl.sum(neg.to(tl.int32), 1) > 0, 1.0, acc2)
            l_p += tl.sum(tl.where(pos & (d != d), 1.0, 0.0), 1)  # NaN distances seen
            l_n += tl.sum(tl.where(neg & (d != d), 1.0, 0.0), 1)

    if LOSS == NT_XENT:  # sweep 2: the positive pairs against the negatives' LSE
        lse_n = _finish_lse(m_n, l_n, c_n)
        for n0 in range(0, M, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            s, _, _ = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                                BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
            same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
            z = lse_n[:, None] - s / p0
            acc0 += tl.sum(tl.where(pos, _softplus_exact(z), 0.0), 1)
            acc1 += tl.sum(tl.where(pos, _sigmoid(z), 0.0), 1)

    has_p = c_p > 0
    has_n = c_n > 0
    cpf = c_p.to(ACC)
    cnf = c_n.to(ACC)
    aux0 = zero
    aux1 = zero
    sum1 = zero
    cnt1 = zero
    if LOSS == CIRCLE or LOSS == UNIFIED or LOSS == MULTI_SIMILARITY:
        lse_p = _finish_lse(m_p, l_p, c_p)
        lse_n = _finish_lse(m_n, l_n, c_n)
        if LOSS == MULTI_SIMILARITY:
            loss = _softplus_exact(lse_p) / p0 + _softplus_exact(lse_n) / p1
            cnt0 = zero + 1.0
        else:
            both = has_p & has_n
            loss = tl.where(both, _softplus20(tl.where(both, lse_p + lse_n, 0.0)), 0.0)
            cnt0 = tl.where(~(loss <= 0.0), 1.0, 0.0)
        aux0 = lse_p
        aux1 = lse_n
    elif LOSS == SUP_CON:
        lse = _finish_lse(m_p, l_p, c_p + c_n)
        mean_p = acc0 / tl.where(has_p, cpf, 1.0)
        loss = tl.where(has_p, tl.where(has_p, lse, 0.0) - mean_p, 0.0)
        cnt0 = tl.where(~(loss <= 0.0), 1.0, 0.0)
        aux0 = lse
        aux1 = mean_p
    elif LOSS == NT_XENT:
        loss = acc0
        cnt0 = cpf
        aux0 = _finish_lse(m_n, l_n, c_n)
        aux1 = acc1
    elif LOSS == CONTRASTIVE:
        loss = acc0
        cnt0 = acc1
        sum1 = acc2
        cnt1 = acc3
    else:
        valid = has_p & has_n
        loss = tl.where(valid, tl.maximum((tl.where(valid, m_p, 0.0) - tl.where(valid, m_n, 0.0)) + p0, 0.0), 0.0)
        loss = tl.where(valid & ((l_p + l_n) > 0.0), float("nan"), loss)
        cnt0 = tl.where(valid & ~(loss <= 0.0), 1.0, 0.0)
        aux0 = acc1
        aux1 = acc3
    base = STATS + rows * NUM_STATS
    tl.store(base + ST_AUX0, aux0, mask=row_ok)
    tl.store(base + ST_AUX1, aux1, mask=row_ok)
    tl.store(base + ST_SUM0, loss, mask=row_ok)
    tl.store(base + ST_COUNT0, cnt0, mask=row_ok)
    tl.store(base + ST_SUM1, sum1, mask=row_ok)
    tl.store(base + ST_COUNT1, cnt1, mask=row_ok)
    tl.store(base + ST_NUM_POS, cpf, mask=row_ok)
    tl.store(base + ST_NUM_NEG, cnf, mask=row_ok)


@triton.jit
def _row_coefs(STATS, W, rows, row_ok, LOSS: tl.constexpr, TERMS: tl.constexpr, p0, p1):
    """Per-row constants of the gradient tile, from the saved statistics and upstream weights."""
    base = STATS + rows * NUM_STATS
    aux0 = tl.load(base + ST_AUX0, mask=row_ok, other=0.0)
    aux1 = tl.load(base + ST_AUX1, mask=row_ok, other=0.0)
    loss = tl.load(base + ST_SUM0, mask=row_ok, other=0.0)
    cnt0 = tl.load(base + ST_COUNT0, mask=row_ok, other=0.0)
    npos = tl.load(base + ST_NUM_POS, mask=row_ok, other=0.0)
    nneg = tl.load(base + ST_NUM_NEG, mask=row_ok, other=0.0)
    w0 = tl.load(W + rows * TERMS, mask=row_ok, other=0.0)
    w1 = w0
    if TERMS == 2:
        w1 = tl.load(W + rows * TERMS + 1, mask=row_ok, other=0.0)
    c0 = w0
    c1 = w1
    if LOSS == CIRCLE or LOSS == UNIFIED:  # joint softplus of the two LSEs, rows counted by their loss
        both = (npos > 0.0) & (nneg > 0.0) & (cnt0 != 0.0)
        g = _softplus20_grad(tl.where(both, aux0 + aux1, 0.0))
        c0 = tl.where(both, w0 * g, 0.0)
        c1 = c0
    elif LOSS == MULTI_SIMILARITY:
        c0 = tl.where(npos > 0.0, w0 * _sigmoid(aux0) / p0, 0.0)
        c1 = tl.where(nneg > 0.0, w0 * _sigmoid(aux1) / p1, 0.0)
    elif LOSS == SUP_CON:
        c0 = w0 * cnt0 / p0
        c1 = c0 / tl.where(npos > 0.0, npos, 1.0)
    elif LOSS == NT_XENT:
        c0 = w0 / p0
        c1 = w0 * aux1 / p0
    elif LOSS == TRIPLET_HARD:
        c0 = w0 * cnt0 * _relu_grad(loss)
    return aux0, aux1, c0, c1


@triton.jit
def _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, LOSS: tl.constexpr, p0, p1, p2):
    if LOSS == CIRCLE or LOSS == UNIFIED or LOSS == MULTI_SIMILARITY:
        a, da = _pair_logits(s, same, LOSS, p0, p1, p2)
        lse = tl.where(same, aux0[:, None], aux1[:, None])
        e = tl.exp(tl.where(pos | neg, a - lse, float("-inf")))
        g = tl.where(pos, c0[:, None] * e * da, tl.where(neg, c1[:, None] * e * da, 0.0))
    elif LOSS == SUP_CON:
        e = tl.exp(tl.where(pos | neg, s / p0 - aux0[:, None], float("-inf")))
        g = tl.where(pos | neg, c0[:, None] * e, 0.0) - tl.where(pos, c1[:, None], 0.0)
    elif LOSS == NT_XENT:
        z = aux0[:, None] - s / p0
        g = tl.where(pos, -c0[:, None] * _sigmoid(z), tl.where(neg, c1[:, None] * tl.exp(tl.where(neg, -z, 0.0)), 0.0))
    elif LOSS == CONTRASTIVE:
        d = _unit_distance(s)
        dd = _unit_distance_grad(d)
        g = tl.where(pos, c0[:, None] * _relu_grad(d - p0) * dd, tl.where(neg, -c1[:, None] * _relu_grad(p1 - d) * dd, 0.0))
    else:
        d = _unit_distance(s)
        dd = _unit_distance_grad(d)
        colf = cols.to(s.dtype)[None, :]
        g = tl.where(colf == aux0[:, None], c0[:, None] * dd, tl.where(colf == aux1[:, None], -c0[:, None] * dd, 0.0))
        g = tl.where(pos | neg, g, 0.0)
    return g


@triton.jit
def _pairwise_bwd_rows_kernel(X, R, LAB, RLAB, STATS, W, DX, B, M, D, stride_x, stride_r, p0, p1, p2, SELF_OFFSET,
                              LOSS: tl.constexpr, TERMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DX[rows] = sum over reference tiles of G[rows, cols] @ R[cols]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    aux0, aux1, c0, c1 = _row_coefs(STATS, W, rows, row_ok, LOSS, TERMS, p0, p1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        s, _, rt = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
        g = _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, LOSS, p0, p1, p2)
        acc += tl.dot(g.to(rt.dtype), rt, input_precision=PRECISION, out_dtype=ACC)
    ks = tl.arange(0, BLOCK_D)
    tl.store(DX + rows[:, None] * D + ks[None, :], acc, mask=row_ok[:, None] & (ks[None, :] < D))


@triton.jit
def _pairwise_bwd_cols_kernel(X, R, LAB, RLAB, STATS, W, DR, B, M, D, stride_x, stride_r, p0, p1, p2, SELF_OFFSET,
                              ACCUMULATE: tl.constexpr, LOSS: tl.constexpr, TERMS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DR[cols] (+)= sum over anchor blocks of G[rows, cols]^T @ X[rows]."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        lab = tl.load(LAB + rows, mask=row_ok, other=0)
        aux0, aux1, c0, c1 = _row_coefs(STATS, W, rows, row_ok, LOSS, TERMS, p0, p1)
        s, xt, _ = _sim_tile(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC, UPCAST)
        same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
        g = _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, LOSS, p0, p1, p2)
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


def check_supported(x: torch.Tensor, loss: int) -> str | None:
    """None when the kernels take this problem, else the reason."""
    if loss not in SUPPORTED:
        why = _UNSUPPORTED_WHY.get(loss, f"the {PairLoss(loss).name.lower()} loss has no Triton kernel")
        return why + "; use backend='cuda'"
    if x.shape[1] > MAX_D:
        return f"the Triton pairwise kernels hold the embedding in one tile and take D <= {MAX_D}, got D={x.shape[1]}"
    return None


def _params(params):
    p = [float(v) for v in params] + [0.0] * (3 - len(params))
    return p[0], p[1], p[2]


def _common(x, loss):
    bm, bn, bd, warps = _config(x.shape[1], x.dtype, x.device)
    return (bm, bn), dict(LOSS=loss, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(x.dtype),
                          ACC=_acc(x.dtype), UPCAST=_upcast(x), num_warps=warps)


def forward_row_stats(x, labels, ref, ref_labels, self_offset: int, loss: int, params) -> torch.Tensor:
    """(B, NUM_STATS) row statistics in float32 (float64 for float64 x)."""
    B, D = x.shape
    M = ref.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = torch.zeros((B, NUM_STATS), dtype=stat_dtype, device=x.device)
    if B == 0 or M == 0:
        if loss in (PairLoss.CIRCLE, PairLoss.UNIFIED, PairLoss.MULTI_SIMILARITY):
            stats[:, PairStat.AUX0] = float("-inf")
            stats[:, PairStat.AUX1] = float("-inf")
        return stats
    (bm, _), kw = _common(x, loss)
    _pairwise_fwd_kernel[(triton.cdiv(B, bm),)](
        x, ref, labels, ref_labels, stats, B, M, D, x.stride(0), ref.stride(0), *_params(params), int(self_offset), **kw
    )
    return stats


def backward(x, labels, ref, ref_labels, row_stats, row_weights, self_offset: int, ref_is_x: bool, loss: int, params,
             ref_grad: bool):
    """structloss_fast::pairwise_loss_backward_triton: (grad_x, grad_ref) in float32 (float64 for
    float64 x); grad_ref is empty with ref_is_x or without ref_grad."""
    if ref_is_x:
        ref, ref_labels = x, labels
    B, D = x.shape
    M = ref.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.zeros((B, D), dtype=acc_dtype, device=x.device)
    want_ref = ref_grad and not ref_is_x
    grad_ref = torch.zeros((M if want_ref else 0, D), dtype=acc_dtype, device=x.device)
    if B == 0 or M == 0:
        return grad_x, grad_ref
    row_stats = row_stats.to(acc_dtype).contiguous()
    row_weights = row_weights.to(acc_dtype).contiguous()
    (bm, bn), kw = _common(x, loss)
    args = (x, ref, labels, ref_labels, row_stats, row_weights)
    scalars = (B, M, D, x.stride(0), ref.stride(0), *_params(params), int(self_offset))
    terms = row_weights.shape[1]
    _pairwise_bwd_rows_kernel[(triton.cdiv(B, bm),)](*args, grad_x, *scalars, TERMS=terms, **kw)
    if ref_is_x or want_ref:
        target = grad_x if ref_is_x else grad_ref
        _pairwise_bwd_cols_kernel[(triton.cdiv(M, bn),)](
            *args, target, *scalars, ACCUMULATE=ref_is_x, TERMS=terms, **kw
        )
    return grad_x, grad_ref


# ---------------------------------------------------------------- the twin ops' kernels


def forward(x, labels, ref, ref_labels, self_offset: int, ref_is_x: bool, loss: int, params, grad_mode: int):
    """structloss_fast::pairwise_loss_triton: the compiled op's contract. The Python glue never
    asks it for forward gradients (on a GPU recomputing them in backward, flash-attention style,
    is cheaper); when asked, it runs the backward kernels with unit weights per term."""
    ref_in, ref_lab = (x, labels) if ref_is_x else (ref, ref_labels)
    stats = forward_row_stats(x, labels, ref_in, ref_lab, self_offset, loss, params)
    B, D = x.shape
    M = ref.shape[0]
    T = PAIR_LOSS_INFO[loss].terms if grad_mode != PairGradMode.NONE else 0
    want_ref = grad_mode == PairGradMode.X_REF and not ref_is_x
    grad_x = stats.new_zeros((T, B, D))
    grad_ref = stats.new_zeros((T if want_ref else 0, M, D))
    for k in range(T):
        unit = stats.new_zeros((B, PAIR_LOSS_INFO[loss].terms))
        unit[:, k] = 1
        gx, gr = backward(x, labels, ref, ref_labels, stats, unit, self_offset, ref_is_x, loss, params, want_ref)
        grad_x[k] = gx
        if want_ref:
            grad_ref[k] = gr
    return stats, grad_x, grad_ref


# ---------------------------------------------------------------- ahead-of-time compile check


def aot_configs():
    """(kernel, signature, constexprs, num_warps) of configurations that tests/test_triton_build.py
    compiles for sm_90 without a GPU: every kernel and supported loss in bf16, and Circle in
    fp32 and fp64, at the GPU block sizes of D = 128."""
    out = []
    for loss in SUPPORTED:
        dtypes = [("bf16", "fp32")] + ([("fp32", "fp32"), ("fp64", "fp64")] if loss == PairLoss.CIRCLE else [])
        for x_dtype, acc in dtypes:
            torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[x_dtype]
            bm, bn, bd, warps = _config(128, torch_dtype, torch.device("cuda"))
            terms = PAIR_LOSS_INFO[loss].terms
            sig = {"X": f"*{x_dtype}", "R": f"*{x_dtype}", "LAB": "*i64", "RLAB": "*i64", "STATS": f"*{acc}"}
            scalars = {"B": "i32", "M": "i32", "D": "i32", "stride_x": "i32", "stride_r": "i32", "p0": "fp32",
                       "p1": "fp32", "p2": "fp32", "SELF_OFFSET": "i32"}
            consts = dict(LOSS=int(loss), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(torch_dtype),
                          ACC=_acc(torch_dtype), UPCAST=False)
            out.append((_pairwise_fwd_kernel, {**sig, **scalars}, consts, warps))
            out.append((_pairwise_bwd_rows_kernel, {**sig, "W": f"*{acc}", "DX": f"*{acc}", **scalars},
                        {**consts, "TERMS": terms}, warps))
            out.append((_pairwise_bwd_cols_kernel, {**sig, "W": f"*{acc}", "DR": f"*{acc}", **scalars},
                        {**consts, "TERMS": terms, "ACCUMULATE": True}, warps))
    return out

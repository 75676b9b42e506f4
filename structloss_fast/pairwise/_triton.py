"""Triton kernels of the fused pairwise engine (flash-attention style, no B x M matrix).

Forward: programs over (block of anchor rows, split of the references) walk their reference
tiles, form S = X R^T on the fly (fp32 accumulation; bf16/fp16 tiles on tensor cores, fp32 as
3xTF32 on tensor cores, fp64 in fp64) and keep online per-row states (running max and sum-exp
per set, sums, counts, arg-extrema); a finish kernel merges the splits' states in order and
writes the engine's 8 row statistics (PairStat, csrc/common/ids.h). The references are split
only when the row blocks alone would leave the GPU idle (B = 2048 is 32 blocks of 64 rows:
a quarter of an H100). NT-Xent needs a second sweep once the negatives' log-sum-exp is known
(one split). Backward: two kernels that recompute the tiles, so neither needs atomics and the
result is deterministic: one over row blocks (dX += G R), one over reference blocks
(dR += G^T X), each also split over chunks of the embedding dimension (grid axis 1) and over
its sweep (grid axis 2, per-split partials summed in order). Triplet loss over all triplets
needs per-anchor sorted distance lists and has no Triton kernel (the compiled CUDA backend
covers it).

Every launch comes from the configuration table (GPU_TABLE): an entry either holds the
embedding in one tile (D up to its max_size: the anchor tile stays put while the references
stream by) or loops over D in BLOCK_K chunks (any D). Index arithmetic is 64-bit. The same
code runs on CPU tensors under TRITON_INTERPRET=1 (with INTERPRETER_TABLE's small blocks and
up to 3 splits, so that the D loops and the merges run), which is how it is tested without a
GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ids import PAIR_LOSS_INFO, PairGradMode, PairLoss, PairStat
from .._triton_support import AotConfig, Entry, f64, f64_bits, launch, pick, rows_layout

SUPPORTED = (PairLoss.CIRCLE, PairLoss.UNIFIED, PairLoss.MULTI_SIMILARITY, PairLoss.SUP_CON, PairLoss.NT_XENT,
             PairLoss.CONTRASTIVE, PairLoss.TRIPLET_HARD)
# Why the others have no kernel here ("auto" then takes the CUDA backend's strip engine).
_UNSUPPORTED_WHY = {
    PairLoss.TRIPLET_ALL: "triplet loss over all triplets has no Triton kernel (it needs per-anchor sorted distances)",
}
# Batch-hard triplets keep the chosen reference columns in the (float32) row statistics.
MAX_INDEXED_REFS = 1 << 24

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
# The forward's per-row state of one split of the reference sweep (merged by the finish kernel).
PART_COLUMNS = ("m_p", "l_p", "m_n", "l_n", "acc0", "acc1", "acc2", "acc3", "c_p", "c_n")
NUM_PART: tl.constexpr = tl.constexpr(len(PART_COLUMNS))
PT_M_P: tl.constexpr = tl.constexpr(PART_COLUMNS.index("m_p"))
PT_L_P: tl.constexpr = tl.constexpr(PART_COLUMNS.index("l_p"))
PT_M_N: tl.constexpr = tl.constexpr(PART_COLUMNS.index("m_n"))
PT_L_N: tl.constexpr = tl.constexpr(PART_COLUMNS.index("l_n"))
PT_ACC0: tl.constexpr = tl.constexpr(PART_COLUMNS.index("acc0"))
PT_ACC1: tl.constexpr = tl.constexpr(PART_COLUMNS.index("acc1"))
PT_ACC2: tl.constexpr = tl.constexpr(PART_COLUMNS.index("acc2"))
PT_ACC3: tl.constexpr = tl.constexpr(PART_COLUMNS.index("acc3"))
PT_C_P: tl.constexpr = tl.constexpr(PART_COLUMNS.index("c_p"))
PT_C_N: tl.constexpr = tl.constexpr(PART_COLUMNS.index("c_n"))
# Losses of the distance ||x - r||, which needs the rows' squared norms.
DISTANCE_LOSSES = (PairLoss.CONTRASTIVE, PairLoss.TRIPLET_HARD)


def _entry(dtypes, max_d, block_m, block_n, block_k, block_do, warps, stages):
    return Entry(dtypes, max_d, (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k),
                                 ("BLOCK_DO", block_do)), warps, stages)


HALF = ("bf16", "fp16")
# The configuration table of the GPU: per dtype, entries that hold D in one tile (max_size = D
# bound, BLOCK_K = BLOCK_DO >= it) and one that tiles D (max_size None): every D has an entry.
# BLOCK_K chunks the products over D, BLOCK_DO the backward's output columns. Chosen so that
# ptxas spills little (8 warps where 4 spilled hundreds of bytes; fp32's 3xTF32 splits need
# smaller tiles); not tuned on a GPU.
# tests/test_triton_build.py compiles each for sm_90 against the 227 KB of shared memory and
# reports registers and spills.
GPU_TABLE = (
    _entry(HALF, 128, 64, 64, 128, 128, 8, 2),
    _entry(HALF, 256, 64, 32, 256, 256, 8, 2),
    _entry(HALF, None, 64, 64, 64, 128, 8, 3),
    _entry(("fp32",), 64, 64, 32, 64, 64, 4, 2),
    _entry(("fp32",), None, 64, 32, 32, 64, 4, 3),
    _entry(("fp64",), 32, 32, 32, 32, 32, 4, 1),
    _entry(("fp64",), None, 32, 32, 16, 64, 4, 2),
)
# Under the interpreter: small blocks, so that the tests' small D already loop over chunks.
INTERPRETER_TABLE = (_entry(HALF + ("fp32", "fp64"), 16, 16, 16, 16, 16, 4, 1),
                     _entry(HALF + ("fp32", "fp64"), None, 16, 16, 16, 16, 4, 1))


def table(device: torch.device) -> tuple:
    return GPU_TABLE if device.type == "cuda" else INTERPRETER_TABLE


def resident(entry: Entry) -> bool:
    """Whether the entry holds the whole embedding in one tile (then no D loops)."""
    return entry.max_size is not None


def precision(dtype) -> str:
    """tl.dot's input precision: 16-bit tiles natively on tensor cores; fp32 as 3xTF32 (three
    TF32 products of the split operands, about fp32's accuracy at tensor-core speed); fp64 as is."""
    return {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32")


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
def _distance(s, nx, nr):
    """||x - r|| from x.r and the squared norms: 1 for unit rows, 0 for the zero rows that
    normalizing a zero embedding gives (a NaN stays NaN)."""
    sq = (nx[:, None] + nr[None, :]) - 2.0 * s
    return tl.sqrt(tl.where(sq < 0.0, 0.0, sq))


@triton.jit
def _distance_grad(d):
    return tl.where(d > 0.0, -1.0 / tl.where(d > 0.0, d, 1.0), tl.where(d != d, d, 0.0))


@triton.jit
def _relu_grad(x):
    return tl.where(x > 0.0, 1.0, tl.where(x != x, x, 0.0))




@triton.jit
def _load_rows(P, rows, row_ok, k0, D, stride, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """P[rows, k0:k0 + BLOCK] (zero outside), rows of unit inner stride; 64-bit offsets."""
    ks = k0 + tl.arange(0, BLOCK)
    t = tl.load(P + rows.to(tl.int64)[:, None] * stride + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :],
                other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _sim_loop(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """S = X[rows] R[cols]^T accumulated over D in BLOCK_K chunks."""
    s = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, D, BLOCK_K):
        xk = _load_rows(X, rows, row_ok, k0, D, stride_x, BLOCK_K, UPCAST)
        rk = _load_rows(R, cols, col_ok, k0, D, stride_r, BLOCK_K, UPCAST)
        s = tl.dot(xk, tl.trans(rk), s, input_precision=PRECISION, out_dtype=ACC)
    return s


@triton.jit
def _tile_similarity(X, R, xt, rt, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                     ACC: tl.constexpr, UPCAST: tl.constexpr):
    """S of the tile: from the tiles xt, rt when they hold all of D (RESIDENT), else over D in
    BLOCK_K chunks."""
    if RESIDENT:
        s = tl.dot(xt, tl.trans(rt), input_precision=PRECISION, out_dtype=ACC)
    else:
        s = _sim_loop(X, R, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                      ACC, UPCAST)
    return s


@triton.jit
def _squared_norms(N, idx, ok, LOSS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The rows' squared norms for the distance losses (zeros, unread, for the others)."""
    if LOSS == CONTRASTIVE or LOSS == TRIPLET_HARD:
        return tl.load(N + idx, mask=ok, other=0.0).to(ACC)
    else:
        return tl.zeros((BLOCK,), ACC)


@triton.jit
def _grad_operand(g, like, UPCAST: tl.constexpr):
    """The gradient tile as the second product reads it: in the tiles' dtype (bf16/fp16 on
    the GPU). Under the interpreter bf16 tiles are widened, so round G to bf16 here too: the
    tests then see the GPU's rounding."""
    if UPCAST:
        return g.to(tl.bfloat16).to(tl.float32)
    return g.to(like.dtype)


@triton.jit
def _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET):
    rlab = tl.load(RLAB + cols, mask=col_ok, other=0)
    same = lab[:, None] == rlab[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    pos = same & valid
    if SELF_OFFSET >= 0:
        pos = pos & (((rows.to(tl.int64) + SELF_OFFSET) % M)[:, None] != cols[None, :])
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
def _pairwise_fwd_kernel(X, R, NX, NR, LAB, RLAB, PART, B, M, D, stride_x, stride_r, p0_bits, p1_bits, p2_bits,
                         SELF_OFFSET, split_len, LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                         UPCAST: tl.constexpr):
    """Program (row block, split): the row block against references [split * split_len, ...),
    its per-row state written to PART (B, splits, NUM_PART) for _pairwise_finish_kernel."""
    p0 = f64(p0_bits).to(ACC)
    p1 = f64(p1_bits).to(ACC)
    p2 = f64(p2_bits).to(ACC)
    split = tl.program_id(1)
    n_lo = split * split_len
    n_hi = tl.minimum(M, n_lo + split_len)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    zero = tl.zeros((BLOCK_M,), ACC)
    xt = 0.0
    if RESIDENT:
        xt = _load_rows(X, rows, row_ok, 0, D, stride_x, BLOCK_K, UPCAST)
    nx = _squared_norms(NX, rows, row_ok, LOSS, BLOCK_M, ACC)
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
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        rt = xt  # (unread unless RESIDENT)
        if RESIDENT:
            rt = _load_rows(R, cols, col_ok, 0, D, stride_r, BLOCK_K, UPCAST)
        s = _tile_similarity(X, R, xt, rt, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M, BLOCK_N,
                             BLOCK_K, RESIDENT, PRECISION, ACC, UPCAST)
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
            d = _distance(s, nx, _squared_norms(NR, cols, col_ok, LOSS, BLOCK_N, ACC))
            lp = tl.maximum(d - p0, 0.0)
            ln = tl.maximum(p1 - d, 0.0)
            lp = tl.where(d != d, d, lp)
            ln = tl.where(d != d, d, ln)
            acc0 += tl.sum(tl.where(pos, lp, 0.0), 1)
            acc1 += tl.sum(tl.where(pos & ~(lp <= 0.0), 1.0, 0.0), 1)
            acc2 += tl.sum(tl.where(neg, ln, 0.0), 1)
            acc3 += tl.sum(tl.where(neg & ~(ln <= 0.0), 1.0, 0.0), 1)
        else:  # batch-hard triplets: largest positive distance, smallest negative distance, first index
            d = _distance(s, nx, _squared_norms(NR, cols, col_ok, LOSS, BLOCK_N, ACC))
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
            # NaN distances seen (max/min skip a NaN on the GPU, and the interpreter follows)
            l_p += tl.sum(tl.where(pos & (d != d), 1.0, 0.0), 1)
            l_n += tl.sum(tl.where(neg & (d != d), 1.0, 0.0), 1)

    if LOSS == NT_XENT:  # sweep 2: the positive pairs against the negatives' LSE
        lse_n = _finish_lse(m_n, l_n, c_n)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            rt = xt
            if RESIDENT:
                rt = _load_rows(R, cols, col_ok, 0, D, stride_r, BLOCK_K, UPCAST)
            s = _tile_similarity(X, R, xt, rt, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M, BLOCK_N,
                                 BLOCK_K, RESIDENT, PRECISION, ACC, UPCAST)
            same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
            z = lse_n[:, None] - s / p0
            acc0 += tl.sum(tl.where(pos, _softplus_exact(z), 0.0), 1)
            acc1 += tl.sum(tl.where(pos, _sigmoid(z), 0.0), 1)

    part = PART + (rows * tl.num_programs(1) + split) * NUM_PART
    tl.store(part + PT_M_P, m_p, mask=row_ok)
    tl.store(part + PT_L_P, l_p, mask=row_ok)
    tl.store(part + PT_M_N, m_n, mask=row_ok)
    tl.store(part + PT_L_N, l_n, mask=row_ok)
    tl.store(part + PT_ACC0, acc0, mask=row_ok)
    tl.store(part + PT_ACC1, acc1, mask=row_ok)
    tl.store(part + PT_ACC2, acc2, mask=row_ok)
    tl.store(part + PT_ACC3, acc3, mask=row_ok)
    tl.store(part + PT_C_P, c_p.to(ACC), mask=row_ok)
    tl.store(part + PT_C_N, c_n.to(ACC), mask=row_ok)


@triton.jit
def _merge_lse(m, l, m2, l2):
    """Two running (max, sum-exp) pairs as one."""
    m_new = tl.maximum(m, m2)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - shift) + l2 * tl.exp(m2 - shift)


@triton.jit
def _pairwise_finish_kernel(PART, STATS, B, splits, p0_bits, p1_bits, p2_bits, LOSS: tl.constexpr,
                            BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """Merge the splits' per-row states in split order (so ties keep the first index, as one
    sweep would) and write the engine's row statistics."""
    p0 = f64(p0_bits).to(ACC)
    p1 = f64(p1_bits).to(ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    zero = tl.zeros((BLOCK_M,), ACC)
    m_p = zero + float("-inf")
    m_n = zero + float("-inf")
    l_p = zero
    l_n = zero
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    c_p = zero
    c_n = zero
    for split in range(0, splits):
        part = PART + (rows * splits + split) * NUM_PART
        m_p2 = tl.load(part + PT_M_P, mask=row_ok, other=float("-inf"))
        l_p2 = tl.load(part + PT_L_P, mask=row_ok, other=0.0)
        m_n2 = tl.load(part + PT_M_N, mask=row_ok, other=float("-inf"))
        l_n2 = tl.load(part + PT_L_N, mask=row_ok, other=0.0)
        a0 = tl.load(part + PT_ACC0, mask=row_ok, other=0.0)
        a1 = tl.load(part + PT_ACC1, mask=row_ok, other=0.0)
        a2 = tl.load(part + PT_ACC2, mask=row_ok, other=0.0)
        a3 = tl.load(part + PT_ACC3, mask=row_ok, other=0.0)
        if LOSS == TRIPLET_HARD:  # extremes and their first index; NaN distances counted
            better = (a0 > 0.0) & ((m_p2 > m_p) | (acc0 == 0.0))
            m_p = tl.where(better, m_p2, m_p)
            acc1 = tl.where(better, a1, acc1)
            acc0 = tl.maximum(acc0, a0)
            better_n = (a2 > 0.0) & ((m_n2 < m_n) | (acc2 == 0.0))
            m_n = tl.where(better_n, m_n2, m_n)
            acc3 = tl.where(better_n, a3, acc3)
            acc2 = tl.maximum(acc2, a2)
            l_p += l_p2
            l_n += l_n2
        else:
            m_p, l_p = _merge_lse(m_p, l_p, m_p2, l_p2)
            m_n, l_n = _merge_lse(m_n, l_n, m_n2, l_n2)
            acc0 += a0
            acc1 += a1
            acc2 += a2
            acc3 += a3
        c_p += tl.load(part + PT_C_P, mask=row_ok, other=0.0)
        c_n += tl.load(part + PT_C_N, mask=row_ok, other=0.0)

    has_p = c_p > 0.0
    has_n = c_n > 0.0
    cpf = c_p
    cnf = c_n
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
def _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, nx, nr, LOSS: tl.constexpr, p0, p1, p2):
    """dl/ds of the tile; for the distance losses dl/dd * dd/ds with dd/ds = -1/d (the
    kernels add the norms' part, (sum_j G_ij) x_i, at the end)."""
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
        d = _distance(s, nx, nr)
        dd = _distance_grad(d)
        g = tl.where(pos, c0[:, None] * _relu_grad(d - p0) * dd, tl.where(neg, -c1[:, None] * _relu_grad(p1 - d) * dd, 0.0))
    else:
        d = _distance(s, nx, nr)
        dd = _distance_grad(d)
        colf = cols.to(s.dtype)[None, :]
        g = tl.where(colf == aux0[:, None], c0[:, None] * dd, tl.where(colf == aux1[:, None], -c0[:, None] * dd, 0.0))
        g = tl.where(pos | neg, g, 0.0)
    return g


@triton.jit
def _pairwise_bwd_rows_kernel(X, R, NX, NR, LAB, RLAB, STATS, W, DX, B, M, D, stride_x, stride_r, p0_bits, p1_bits,
                              p2_bits, SELF_OFFSET, split_len, LOSS: tl.constexpr, TERMS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_DO: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                              ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DX[split, rows, chunk] = sum over the split's reference tiles of G[rows, cols] @ R[cols,
    chunk]; grid axis 1 runs over the BLOCK_DO chunks of D (one chunk when RESIDENT), axis 2 over
    splits of the references (DX holds one (B, D) partial per split, summed by the launcher)."""
    p0 = f64(p0_bits).to(ACC)
    p1 = f64(p1_bits).to(ACC)
    p2 = f64(p2_bits).to(ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    d0 = tl.program_id(1) * BLOCK_DO
    split = tl.program_id(2)
    n_lo = split * split_len
    n_hi = tl.minimum(M, n_lo + split_len)
    lab = tl.load(LAB + rows, mask=row_ok, other=0)
    aux0, aux1, c0, c1 = _row_coefs(STATS, W, rows, row_ok, LOSS, TERMS, p0, p1)
    xt = 0.0
    if RESIDENT:
        xt = _load_rows(X, rows, row_ok, 0, D, stride_x, BLOCK_K, UPCAST)
    nx = _squared_norms(NX, rows, row_ok, LOSS, BLOCK_M, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    g_sum = tl.zeros((BLOCK_M,), ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        if RESIDENT:  # the tile holds D: it is also the product's operand
            r_out = _load_rows(R, cols, col_ok, 0, D, stride_r, BLOCK_K, UPCAST)
        else:
            r_out = _load_rows(R, cols, col_ok, d0, D, stride_r, BLOCK_DO, UPCAST)
        s = _tile_similarity(X, R, xt, r_out, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M, BLOCK_N,
                             BLOCK_K, RESIDENT, PRECISION, ACC, UPCAST)
        same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
        nr = _squared_norms(NR, cols, col_ok, LOSS, BLOCK_N, ACC)
        g = _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, nx, nr, LOSS, p0, p1, p2)
        acc = tl.dot(_grad_operand(g, r_out, UPCAST), r_out, acc, input_precision=PRECISION, out_dtype=ACC)
        if LOSS == CONTRASTIVE or LOSS == TRIPLET_HARD:
            g_sum += tl.sum(g, 1)
    ks = d0 + tl.arange(0, BLOCK_DO)
    if LOSS == CONTRASTIVE or LOSS == TRIPLET_HARD:  # d(|x|^2)/dx: the distance's x part
        acc -= g_sum[:, None] * _load_rows(X, rows, row_ok, d0, D, stride_x, BLOCK_DO, UPCAST).to(ACC)
    out = DX + split.to(tl.int64) * B * D
    tl.store(out + rows[:, None] * D + ks[None, :], acc, mask=row_ok[:, None] & (ks[None, :] < D))


@triton.jit
def _pairwise_bwd_cols_kernel(X, R, NX, NR, LAB, RLAB, STATS, W, DR, B, M, D, stride_x, stride_r, p0_bits, p1_bits,
                              p2_bits, SELF_OFFSET, split_len, ACCUMULATE: tl.constexpr, LOSS: tl.constexpr,
                              TERMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr, RESIDENT: tl.constexpr,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """DR[split, cols, chunk] (+)= sum over the split's anchor blocks of G[rows, cols]^T @
    X[rows, chunk] (ACCUMULATE only with one split)."""
    p0 = f64(p0_bits).to(ACC)
    p1 = f64(p1_bits).to(ACC)
    p2 = f64(p2_bits).to(ACC)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    d0 = tl.program_id(1) * BLOCK_DO
    split = tl.program_id(2)
    m_lo = split * split_len
    m_hi = tl.minimum(B, m_lo + split_len)
    rt = 0.0
    if RESIDENT:
        rt = _load_rows(R, cols, col_ok, 0, D, stride_r, BLOCK_K, UPCAST)
    nr = _squared_norms(NR, cols, col_ok, LOSS, BLOCK_N, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), ACC)
    g_sum = tl.zeros((BLOCK_N,), ACC)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < B
        lab = tl.load(LAB + rows, mask=row_ok, other=0)
        aux0, aux1, c0, c1 = _row_coefs(STATS, W, rows, row_ok, LOSS, TERMS, p0, p1)
        if RESIDENT:  # the tile holds D: it is also the product's operand
            x_out = _load_rows(X, rows, row_ok, 0, D, stride_x, BLOCK_K, UPCAST)
        else:
            x_out = _load_rows(X, rows, row_ok, d0, D, stride_x, BLOCK_DO, UPCAST)
        s = _tile_similarity(X, R, x_out, rt, rows, cols, row_ok, col_ok, D, stride_x, stride_r, BLOCK_M, BLOCK_N,
                             BLOCK_K, RESIDENT, PRECISION, ACC, UPCAST)
        same, pos, neg = _tile_masks(lab, RLAB, rows, cols, row_ok, col_ok, M, SELF_OFFSET)
        nx = _squared_norms(NX, rows, row_ok, LOSS, BLOCK_M, ACC)
        g = _grad_tile(s, same, pos, neg, cols, aux0, aux1, c0, c1, nx, nr, LOSS, p0, p1, p2)
        acc = tl.dot(tl.trans(_grad_operand(g, x_out, UPCAST)), x_out, acc, input_precision=PRECISION,
                     out_dtype=ACC)
        if LOSS == CONTRASTIVE or LOSS == TRIPLET_HARD:
            g_sum += tl.sum(g, 0)
    ks = d0 + tl.arange(0, BLOCK_DO)
    if LOSS == CONTRASTIVE or LOSS == TRIPLET_HARD:  # d(|r|^2)/dr
        acc -= g_sum[:, None] * _load_rows(R, cols, col_ok, d0, D, stride_r, BLOCK_DO, UPCAST).to(ACC)
    out_mask = col_ok[:, None] & (ks[None, :] < D)
    ptrs = DR + split.to(tl.int64) * M * D + cols[:, None] * D + ks[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=out_mask, other=0.0)
    tl.store(ptrs, acc, mask=out_mask)


# ---------------------------------------------------------------- launches


def _upcast(x):
    # Triton 3.8's interpreter computes tl.dot on bfloat16 tiles wrongly (fp16 is fine):
    # under the interpreter, bf16 tiles are widened to fp32 before the products.
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Rows per program of the kernel that merges the forward's splits.
FINISH_BLOCK = 128


def check_supported(x: torch.Tensor, loss: int, num_refs: int | None = None) -> str | None:
    """None when the kernels take this problem, else the reason: derived from the table (every
    dtype has an entry for any D) and the statistics' float32 column indices."""
    if loss not in SUPPORTED:
        why = _UNSUPPORTED_WHY.get(loss, f"the {PairLoss(loss).name.lower()} loss has no Triton kernel")
        return why + "; use backend='cuda'"
    if pick(table(x.device), x.dtype, x.shape[1]) is None:
        return f"the Triton pairwise kernels have no configuration for {x.dtype} embeddings of size {x.shape[1]}"
    refs = x.shape[0] if num_refs is None else num_refs
    if loss == PairLoss.TRIPLET_HARD and x.dtype != torch.float64 and refs > MAX_INDEXED_REFS:
        return (f"batch-hard triplets keep the chosen reference index in float32 statistics: at most "
                f"{MAX_INDEXED_REFS} references, got {refs}")
    return None


def _norms(x, loss, placeholder):
    """Squared row norms (0 or about 1 for normalized rows) for the distance losses; else an
    unread placeholder of the same dtype (one compiled signature for every loss)."""
    if loss not in DISTANCE_LOSSES:
        return placeholder
    return x.to(_stat_dtype(x)).square().sum(1)


def _prepare(x, labels, ref, ref_labels, ref_is_x, loss, params, placeholder):
    x = rows_layout(x)
    labels = labels.contiguous()
    if ref_is_x:
        ref, ref_labels = x, labels
    else:
        ref, ref_labels = rows_layout(ref), ref_labels.contiguous()
    nx = _norms(x, loss, placeholder)
    nr = nx if ref_is_x else _norms(ref, loss, placeholder)
    bits = [f64_bits(v) for v in params] + [0] * (3 - len(params))
    entry = pick(table(x.device), x.dtype, x.shape[1])
    if entry is None:
        raise RuntimeError(check_supported(x, loss))
    return x, labels, ref, ref_labels, nx, nr, bits, entry


def _constexprs(entry: Entry, x_dtype, loss: int, upcast: bool) -> dict:
    return dict(LOSS=int(loss), BLOCK_M=entry.block("BLOCK_M"), BLOCK_N=entry.block("BLOCK_N"),
                BLOCK_K=entry.block("BLOCK_K"), RESIDENT=resident(entry), PRECISION=precision(x_dtype),
                ACC=_acc(x_dtype), UPCAST=upcast)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_sweep(programs: int, length: int, block: int, device: torch.device, allowed: bool = True) -> tuple:
    """(splits, split_len): cut a sweep of `length` (in `block` tiles) into splits so that
    `programs` x splits programs fill the GPU (about two per SM: B = 2048 has 32 row blocks of
    64, a quarter of an H100's 132 SMs); under the interpreter up to 3 splits, so that the tests
    run the merge. One split when not allowed (NT-Xent's two sweeps)."""
    tiles = triton.cdiv(length, block)
    if not allowed:
        splits = 1
    elif device.type == "cuda":
        splits = min(tiles, max(1, triton.cdiv(2 * _multiprocessors(device), programs)))
    else:
        splits = min(tiles, 3)
    split_len = triton.cdiv(tiles, splits) * block
    return triton.cdiv(length, split_len), split_len


def forward_row_stats(x, labels, ref, ref_labels, self_offset: int, loss: int, params, ref_is_x: bool = False):
    """(B, NUM_STATS) row statistics in float32 (float64 for float64 x)."""
    B, D = x.shape
    M = ref.shape[0]
    stats = torch.zeros((B, NUM_STATS), dtype=_stat_dtype(x), device=x.device)
    if B == 0 or M == 0:
        if loss in (PairLoss.CIRCLE, PairLoss.UNIFIED, PairLoss.MULTI_SIMILARITY):
            stats[:, PairStat.AUX0] = float("-inf")
            stats[:, PairStat.AUX1] = float("-inf")
        return stats
    x, labels, ref, ref_labels, nx, nr, bits, entry = _prepare(x, labels, ref, ref_labels, ref_is_x, loss, params,
                                                               stats)
    kw = _constexprs(entry, x.dtype, loss, _upcast(x))
    row_blocks = triton.cdiv(B, kw["BLOCK_M"])
    splits, split_len = split_sweep(row_blocks, M, kw["BLOCK_N"], x.device, allowed=loss != PairLoss.NT_XENT)
    part = torch.empty((B, splits, len(PART_COLUMNS)), dtype=stats.dtype, device=x.device)
    launch(_pairwise_fwd_kernel, (row_blocks, splits),
           x, ref, nx, nr, labels, ref_labels, part, B, M, D, x.stride(0), ref.stride(0), *bits, int(self_offset),
           split_len, num_warps=entry.num_warps, num_stages=entry.num_stages, **kw)
    launch(_pairwise_finish_kernel, (triton.cdiv(B, FINISH_BLOCK),), part, stats, B, splits, *bits, LOSS=int(loss),
           BLOCK_M=FINISH_BLOCK, ACC=kw["ACC"])
    return stats


def _swept(kernel, grid, programs, length, block, out, accumulate, args, scalars, kw):
    """Launch a backward kernel over (programs, D chunks, splits of its sweep): with one split
    straight into `out` (added to it when `accumulate`), else into one partial per split,
    summed in order (deterministic)."""
    splits, split_len = split_sweep(programs * grid[1], length, block, out.device)
    extra = {"ACCUMULATE": accumulate and splits == 1} if kernel is _pairwise_bwd_cols_kernel else {}
    target = out if splits == 1 else torch.empty((splits,) + tuple(out.shape), dtype=out.dtype, device=out.device)
    launch(kernel, grid + (splits,), *args, target, *scalars, split_len, **extra, **kw)
    if splits > 1:
        if accumulate:
            out += target.sum(0)
        else:
            torch.sum(target, 0, out=out)


def backward(x, labels, ref, ref_labels, row_stats, row_weights, self_offset: int, ref_is_x: bool, loss: int, params,
             ref_grad: bool):
    """structloss_fast::pairwise_loss_backward_triton: (grad_x, grad_ref) in float32 (float64 for
    float64 x); grad_ref is empty with ref_is_x or without ref_grad."""
    B, D = x.shape
    M = B if ref_is_x else ref.shape[0]
    acc_dtype = _stat_dtype(x)
    grad_x = torch.zeros((B, D), dtype=acc_dtype, device=x.device)
    want_ref = ref_grad and not ref_is_x
    grad_ref = torch.zeros((M if want_ref else 0, D), dtype=acc_dtype, device=x.device)
    if B == 0 or M == 0:
        return grad_x, grad_ref
    row_stats = row_stats.to(acc_dtype).contiguous()
    x, labels, ref, ref_labels, nx, nr, bits, entry = _prepare(x, labels, ref, ref_labels, ref_is_x, loss, params,
                                                               row_stats)
    row_weights = row_weights.to(acc_dtype).contiguous()
    kw = _constexprs(entry, x.dtype, loss, _upcast(x))
    kw.update(TERMS=row_weights.shape[1], BLOCK_DO=entry.block("BLOCK_DO"), num_warps=entry.num_warps,
              num_stages=entry.num_stages)
    args = (x, ref, nx, nr, labels, ref_labels, row_stats, row_weights)
    scalars = (B, M, D, x.stride(0), ref.stride(0), *bits, int(self_offset))
    d_chunks = triton.cdiv(D, kw["BLOCK_DO"])
    row_blocks = triton.cdiv(B, kw["BLOCK_M"])
    _swept(_pairwise_bwd_rows_kernel, (row_blocks, d_chunks), row_blocks, M, kw["BLOCK_N"], grad_x, False, args,
           scalars, kw)
    if ref_is_x or want_ref:
        col_blocks = triton.cdiv(M, kw["BLOCK_N"])
        _swept(_pairwise_bwd_cols_kernel, (col_blocks, d_chunks), col_blocks, B, kw["BLOCK_M"],
               grad_x if ref_is_x else grad_ref, ref_is_x, args, scalars, kw)
    return grad_x, grad_ref


# ---------------------------------------------------------------- the twin ops' kernels


def forward(x, labels, ref, ref_labels, self_offset: int, ref_is_x: bool, loss: int, params, grad_mode: int):
    """structloss_fast::pairwise_loss_triton: the compiled op's contract. The Python glue never
    asks it for forward gradients (on a GPU recomputing them in backward, flash-attention style,
    is cheaper); when asked, it runs the backward kernels with unit weights per term."""
    ref_in, ref_lab = (x, labels) if ref_is_x else (ref, ref_labels)
    stats = forward_row_stats(x, labels, ref_in, ref_lab, self_offset, loss, params, ref_is_x)
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


def aot_configs(full: bool = False):
    """The specializations tests/test_triton_build.py compiles for sm_90: every GPU_TABLE entry
    for each kernel, as the JIT specializes them for aligned tensors and sizes divisible by 16;
    with Circle loss in the entry's first dtype, or (full=True) every supported loss in every
    dtype of the entry."""
    out = []
    for entry in GPU_TABLE:
        for dt in entry.dtypes if full else entry.dtypes[:1]:
            acc = "fp64" if dt == "fp64" else "fp32"
            tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dt]
            ptrs = {"X": f"*{dt}", "R": f"*{dt}", "NX": f"*{acc}", "NR": f"*{acc}", "LAB": "*i64", "RLAB": "*i64"}
            scalars = {"B": "i32", "M": "i32", "D": "i32", "stride_x": "i32", "stride_r": "i32", "p0_bits": "i64",
                       "p1_bits": "i64", "p2_bits": "i64", "SELF_OFFSET": "i32", "split_len": "i32"}
            divisible = tuple(ptrs) + ("PART", "STATS", "W", "DX", "DR", "D", "stride_x", "stride_r", "split_len")
            for loss in SUPPORTED if full else (PairLoss.CIRCLE,):
                consts = _constexprs(entry, tdt, loss, False)
                label = f"{entry.describe()} {dt} loss={PairLoss(loss).name.lower()}"
                terms = PAIR_LOSS_INFO[loss].terms
                out.append(AotConfig(_pairwise_fwd_kernel, {**ptrs, "PART": f"*{acc}", **scalars}, consts,
                                     entry.num_warps, entry.num_stages, divisible, label))
                out.append(AotConfig(_pairwise_finish_kernel,
                                     {"PART": f"*{acc}", "STATS": f"*{acc}", "B": "i32", "splits": "i32",
                                      "p0_bits": "i64", "p1_bits": "i64", "p2_bits": "i64"},
                                     {"LOSS": int(loss), "BLOCK_M": FINISH_BLOCK, "ACC": consts["ACC"]}, 4, 1,
                                     ("PART", "STATS"), label))
                bwd = {**consts, "TERMS": terms, "BLOCK_DO": entry.block("BLOCK_DO")}
                stats = {"STATS": f"*{acc}", "W": f"*{acc}"}
                out.append(AotConfig(_pairwise_bwd_rows_kernel, {**ptrs, **stats, "DX": f"*{acc}", **scalars},
                                     bwd, entry.num_warps, entry.num_stages, divisible, label))
                out.append(AotConfig(_pairwise_bwd_cols_kernel, {**ptrs, **stats, "DR": f"*{acc}", **scalars},
                                     {**bwd, "ACCUMULATE": True}, entry.num_warps, entry.num_stages, divisible, label))
    return out

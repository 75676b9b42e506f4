"""Triton kernels of the SEAL fused sample-and-score noise-contrastive loss.

Each example b has K + 1 scored label vectors: row 0 the gold vector, row k + 1 sample k (the
generator is the CPU kernel's Philox4x32-10 with the same counters, so both backends draw the
same samples). A program takes EXAMPLES examples at once and their rows in chunks of K_CHUNK
(a tile of EXAMPLES * K_CHUNK rows, several examples per program, any K), builds the label
tile in registers for BLOCK_L labels at a time (any L) and scores it against C1^T with tl.dot,
BLOCK_H hidden units at a time: the B x K x L sample tensor never exists, and the samples are
drawn once per H block (once when H <= BLOCK_H).
Forward: the K + 1 scores and their log-sum-exp (online over the row chunks).
Backward: programs over (H block, chunk of examples) redraw the tiles and accumulate the
gradient of C1, b1, c2 into per-chunk partials (summed afterwards: deterministic, no atomics);
the programs of the first H block also write the gradient of the unary potentials. When L
exceeds BLOCK_L, the per-chunk partial of C1 is accumulated in its (program-owned) slice of
global memory instead of registers.
Index arithmetic is 64-bit. The same code runs on CPU tensors under TRITON_INTERPRET=1 (with
INTERPRETER_TABLE's small blocks, so that the K, L and H loops run), which is how it is tested
without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_support import AotConfig, Entry, launch, pick, rows_layout

# Bytes of the backward's per-chunk partials of C1 (n_chunks x L x H): the number of chunks is
# cut to stay within this (at least 1 chunk).
PARTIALS_BYTES = 1 << 28
# (ROWS, BLOCK_L) of the sampler on the GPU.
BERNOULLI_BLOCKS = (16, 64)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (the generator of at::Philox4_32 and tl.randint4x)."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform24(b, s, ls, L, SEED):
    """The 24-bit uniforms of sample s of example b at labels ls (b, s: (R,) int64 / int32;
    ls: (BLOCK_L,)): label l is word l // J of the Philox call with counter
    (l % J, s, b_lo, b_hi), J = ceil(L / 4), key the 64-bit seed."""
    seed = tl.load(SEED)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    J = (L + 3) // 4
    zero = tl.zeros((b.shape[0], ls.shape[0]), dtype=tl.uint32)
    c0 = zero + (ls % J).to(tl.uint32)[None, :]
    c1 = zero + s.to(tl.uint32)[:, None]
    c2 = zero + (b & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c3 = zero + ((b >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    r0, r1, r2, r3 = _philox(c0, c1, c2, c3, k0, k1)
    lane = (ls // J)[None, :]
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return word >> 8


@triton.jit
def _label_tile(b, k, row_ok, ls, lmask, p, L, K, Y, SAMP, SEED, EXPLICIT: tl.constexpr, ACC: tl.constexpr):
    """(rows, BLOCK_L) tile: the gold labels on rows with k = 0, sample k - 1 on the others,
    zero outside. p is the rows' Bernoulli parameters (rows, BLOCK_L)."""
    gold_ok = (row_ok & (k == 0))[:, None] & lmask[None, :]
    gold = tl.load(Y + b[:, None] * L + ls[None, :], mask=gold_ok, other=0.0).to(ACC)
    valid = (row_ok & (k >= 1))[:, None] & lmask[None, :]
    s = tl.where(k >= 1, k - 1, 0)
    if EXPLICIT:
        on = tl.load(SAMP + (b * K + s)[:, None] * L + ls[None, :], mask=valid, other=0.0).to(ACC)
    else:
        u24 = _uniform24(b, s, ls, L, SEED).to(ACC)
        on = tl.where(valid & (u24 < p * 16777216.0), 1.0, 0.0).to(ACC)
    return tl.where((k == 0)[:, None], gold, on)


@triton.jit
def _labels_at(l0, b, k, row_ok, L, K, P, Y, SAMP, SEED, BLOCK_L: tl.constexpr, EXPLICIT: tl.constexpr,
               ACC: tl.constexpr):
    """Labels [l0, l0 + BLOCK_L) of the tile's rows: (ls, lmask, tile_ok, p, y)."""
    ls = l0 + tl.arange(0, BLOCK_L)
    lmask = ls < L
    tile_ok = row_ok[:, None] & lmask[None, :]
    p = tl.load(P + b[:, None] * L + ls[None, :], mask=tile_ok, other=0.5).to(ACC)
    y = _label_tile(b, k, row_ok, ls, lmask, p, L, K, Y, SAMP, SEED, EXPLICIT, ACC)
    return ls, lmask, tile_ok, p, y


@triton.jit
def _softplus_sigmoid(h):
    # torch's Softplus(threshold=20) and its derivative, from e = exp(-|h|) (a NaN h stays NaN).
    e = tl.exp(-tl.abs(h))
    inv = 1.0 / (1.0 + e)
    sp = tl.where(h > 20.0, h, tl.maximum(h, 0.0) + tl.log(1.0 + e))
    sg = tl.where(h > 20.0, 1.0, tl.where(h < 0.0, e * inv, inv))
    # tl.maximum drops a NaN: put it back.
    sp = tl.where(h != h, h, sp)
    return sp, sg


@triton.jit
def _log_clamped(p):
    # log p clamped at -100 (BCELoss's clamp) without evaluating log(0) (the interpreter warns)
    return tl.where(p == 0.0, -100.0, tl.maximum(tl.log(tl.where(p == 0.0, 1.0, p)), -100.0))


@triton.jit
def _rows(group, k0, B, K, EXAMPLES: tl.constexpr, K_CHUNK: tl.constexpr):
    """The tile's rows: example b and row k of it, EXAMPLES examples x K_CHUNK rows (group is
    int64, so is b)."""
    i = tl.arange(0, EXAMPLES * K_CHUNK)
    b = group * EXAMPLES + (i // K_CHUNK).to(tl.int64)
    k = k0 + i % K_CHUNK
    return b, k, (b < B) & (k <= K)


@triton.jit
def _nce_fwd_kernel(U, P, Y, W1T, B1, C2, SEED, SAMP, STATS, B, L, H, K,
                    USE_LOGQ: tl.constexpr, EXPLICIT: tl.constexpr, EXAMPLES: tl.constexpr, K_CHUNK: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    m_run = tl.full((EXAMPLES,), float("-inf"), ACC)  # online LSE of each example's K + 1 scores
    l_run = tl.zeros((EXAMPLES,), ACC)
    nan_seen = tl.zeros((EXAMPLES,), tl.int32)
    for k0 in range(0, K + 1, K_CHUNK):
        b, k, row_ok = _rows(group, k0, B, K, EXAMPLES, K_CHUNK)
        z = tl.zeros((EXAMPLES * K_CHUNK,), ACC)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            hmask = hs < H
            hid = tl.zeros((EXAMPLES * K_CHUNK, BLOCK_H), ACC)
            for l0 in range(0, L, BLOCK_L):
                ls, lmask, tile_ok, p, y = _labels_at(l0, b, k, row_ok, L, K, P, Y, SAMP, SEED, BLOCK_L, EXPLICIT,
                                                      ACC)
                if h0 == 0:  # the unary and log q terms, once
                    u = tl.load(U + b[:, None] * L + ls[None, :], mask=tile_ok, other=0.0).to(ACC)
                    z += tl.sum(y * u, 1)
                    if USE_LOGQ:
                        lp = tl.where(tile_ok, _log_clamped(p), 0.0)
                        l1p = tl.where(tile_ok, _log_clamped(1.0 - p), 0.0)
                        z -= tl.sum(y * lp + (1.0 - y) * l1p, 1)
                    # a NaN probability poisons the loss (even without log q)
                    z += 0.0 * tl.sum(tl.where(tile_ok, p, 0.0), 1)
                w = tl.load(W1T + ls.to(tl.int64)[:, None] * H + hs[None, :], mask=lmask[:, None] & hmask[None, :],
                            other=0.0)
                hid = tl.dot(y, w, hid, input_precision=PRECISION, out_dtype=ACC)
            b1 = tl.load(B1 + hs, mask=hmask, other=0.0)
            c2 = tl.load(C2 + hs, mask=hmask, other=0.0)
            sp, _ = _softplus_sigmoid(hid + b1[None, :])
            z += tl.sum(tl.where(hmask[None, :], c2[None, :] * sp, 0.0), 1)
        tl.store(STATS + b * (K + 2) + k, z, mask=row_ok)
        # merge the chunk into each example's LSE (the max skips a NaN: counted apart)
        zk = tl.reshape(tl.where(row_ok, z, float("-inf")), (EXAMPLES, K_CHUNK))
        nan_seen += tl.sum(tl.reshape((z != z).to(tl.int32), (EXAMPLES, K_CHUNK)), 1)
        m_new = tl.maximum(m_run, tl.max(zk, 1))
        shift_old = tl.where((m_run == float("inf")) | (m_run == float("-inf")), 0.0, m_run)
        shift = tl.where((m_new == float("inf")) | (m_new == float("-inf")), 0.0, m_new)
        l_run = l_run * tl.exp(shift_old - shift) + tl.sum(tl.exp(zk - shift[:, None]), 1)
        m_run = m_new
    shift = tl.where((m_run == float("inf")) | (m_run == float("-inf")), 0.0, m_run)
    lse = tl.where(nan_seen > 0, float("nan"), shift + tl.log(l_run))
    ex = group * EXAMPLES + tl.arange(0, EXAMPLES)
    tl.store(STATS + ex * (K + 2) + K + 1, lse, mask=ex < B)


@triton.jit
def _nce_bwd_kernel(U, P, Y, W1T, B1, C2, SEED, SAMP, STATS, RW, DU, PART_W, PART_B, PART_C, B, L, H, K, CHUNK,
                    EXPLICIT: tl.constexpr, EXAMPLES: tl.constexpr, K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_H: tl.constexpr, ONE_L_BLOCK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Program (H block hb, chunk c): the examples [c * CHUNK, (c + 1) * CHUNK) (CHUNK a
    multiple of EXAMPLES). ONE_L_BLOCK: L <= BLOCK_L, C1's partial stays in registers."""
    hb = tl.program_id(0)
    c = tl.program_id(1)
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    b1 = tl.load(B1 + hs, mask=hmask, other=0.0)
    c2 = tl.load(C2 + hs, mask=hmask, other=0.0)
    acc_b = tl.zeros((BLOCK_H,), ACC)
    acc_c = tl.zeros((BLOCK_H,), ACC)
    part_w = PART_W + c.to(tl.int64) * L * H
    if ONE_L_BLOCK:
        ls1 = tl.arange(0, BLOCK_L)
        lmask1 = ls1 < L
        w1 = tl.load(W1T + ls1.to(tl.int64)[:, None] * H + hs[None, :], mask=lmask1[:, None] & hmask[None, :],
                     other=0.0)
        acc_w = tl.zeros((BLOCK_L, BLOCK_H), ACC)
    else:  # the partial lives in its slice of PART_W, zeroed first
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            tl.store(part_w + ls.to(tl.int64)[:, None] * H + hs[None, :], tl.zeros((BLOCK_L, BLOCK_H), ACC),
                     mask=(ls < L)[:, None] & hmask[None, :])
    g0 = c.to(tl.int64) * (CHUNK // EXAMPLES)
    g1 = tl.minimum(g0 + CHUNK // EXAMPLES, (B + EXAMPLES - 1) // EXAMPLES)
    for group in range(g0, g1):
        for k0 in range(0, K + 1, K_CHUNK):
            b, k, row_ok = _rows(group, k0, B, K, EXAMPLES, K_CHUNK)
            z = tl.load(STATS + b * (K + 2) + k, mask=row_ok, other=float("-inf"))
            lse = tl.load(STATS + b * (K + 2) + K + 1, mask=row_ok, other=0.0)
            rw = tl.load(RW + b, mask=row_ok, other=0.0)
            wts = tl.where(row_ok, rw * (tl.exp(z - lse) - tl.where(k == 0, 1.0, 0.0)), 0.0)
            # pass 1: the hidden pre-activations need all of L
            hid = tl.zeros((EXAMPLES * K_CHUNK, BLOCK_H), ACC)
            if ONE_L_BLOCK:
                _, _, _, _, y1 = _labels_at(0, b, k, row_ok, L, K, P, Y, SAMP, SEED, BLOCK_L, EXPLICIT, ACC)
                hid = tl.dot(y1, w1, hid, input_precision=PRECISION, out_dtype=ACC)
            else:
                for l0 in range(0, L, BLOCK_L):
                    ls, lmask, _, _, y = _labels_at(l0, b, k, row_ok, L, K, P, Y, SAMP, SEED, BLOCK_L, EXPLICIT, ACC)
                    w = tl.load(W1T + ls.to(tl.int64)[:, None] * H + hs[None, :],
                                mask=lmask[:, None] & hmask[None, :], other=0.0)
                    hid = tl.dot(y, w, hid, input_precision=PRECISION, out_dtype=ACC)
            sp, sg = _softplus_sigmoid(hid + b1[None, :])
            g = tl.where(hmask[None, :], wts[:, None] * c2[None, :] * sg, 0.0)
            acc_b += tl.sum(g, 0)
            acc_c += tl.sum(tl.where(hmask[None, :], wts[:, None] * sp, 0.0), 0)
            # pass 2: C1's gradient y^T g and, in the first H block, the unary gradient
            if ONE_L_BLOCK:
                acc_w = tl.dot(tl.trans(y1), g, acc_w, input_precision=PRECISION, out_dtype=ACC)
                if hb == 0:
                    du = tl.sum(tl.reshape(wts[:, None] * y1, (EXAMPLES, K_CHUNK, BLOCK_L)), 1)
                    _add_du(DU, group, du, ls1, lmask1, B, L, EXAMPLES)
            else:
                for l0 in range(0, L, BLOCK_L):
                    ls, lmask, _, _, y = _labels_at(l0, b, k, row_ok, L, K, P, Y, SAMP, SEED, BLOCK_L, EXPLICIT, ACC)
                    ptrs = part_w + ls.to(tl.int64)[:, None] * H + hs[None, :]
                    wmask = lmask[:, None] & hmask[None, :]
                    part = tl.load(ptrs, mask=wmask, other=0.0)
                    tl.store(ptrs, tl.dot(tl.trans(y), g, part, input_precision=PRECISION, out_dtype=ACC),
                             mask=wmask)
                    if hb == 0:
                        du = tl.sum(tl.reshape(wts[:, None] * y, (EXAMPLES, K_CHUNK, BLOCK_L)), 1)
                        _add_du(DU, group, du, ls, lmask, B, L, EXAMPLES)
    if ONE_L_BLOCK:
        tl.store(part_w + ls1.to(tl.int64)[:, None] * H + hs[None, :], acc_w, mask=lmask1[:, None] & hmask[None, :])
    tl.store(PART_B + c.to(tl.int64) * H + hs, acc_b, mask=hmask)
    tl.store(PART_C + c.to(tl.int64) * H + hs, acc_c, mask=hmask)


@triton.jit
def _add_du(DU, group, du, ls, lmask, B, L, EXAMPLES: tl.constexpr):
    """DU[examples of the group, ls] += du: only this program writes these rows (in order)."""
    ex = group * EXAMPLES + tl.arange(0, EXAMPLES)
    ptrs = DU + ex[:, None] * L + ls[None, :]
    mask = (ex < B)[:, None] & lmask[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + du, mask=mask)


@triton.jit
def _bernoulli_kernel(P, SEED, OUT, B, K, L, ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    """OUT[b, s, :] = the samples the loss kernels draw (OUT in P's dtype, (B, K, L))."""
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    b = i // K
    s = (i % K).to(tl.int32)
    row_ok = b < B
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        ok = row_ok[:, None] & (ls < L)[None, :]
        p = tl.load(P + b[:, None] * L + ls[None, :], mask=ok, other=0.0).to(tl.float64)
        u24 = _uniform24(b, s, ls, L, SEED).to(tl.float64)
        on = tl.where(u24 < p * 16777216.0, 1.0, 0.0)
        tl.store(OUT + i[:, None] * L + ls[None, :], on.to(OUT.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- configuration and launches


def _entry(dtypes, max_l, examples, k_chunk, block_l, block_h, warps, stages):
    return Entry(dtypes, max_l, (("EXAMPLES", examples), ("K_CHUNK", k_chunk), ("BLOCK_L", block_l),
                                 ("BLOCK_H", block_h)), warps, stages)


# The kernels compute in float32 or float64 (the public function converts). Per dtype: an
# entry that holds L in one block (the backward's C1 partial in registers) and one for any L.
# Small label blocks: the Philox draws of a tile live in registers (BLOCK_L = 256 needed 262 KB
# of shared memory and spilled kilobytes). Not tuned on a GPU; tests/test_triton_build.py
# compiles each for sm_90.
GPU_TABLE = (
    _entry(("fp32",), 32, 4, 8, 32, 64, 4, 1),
    _entry(("fp32",), None, 4, 8, 32, 64, 4, 2),
    _entry(("fp64",), 32, 4, 8, 32, 32, 4, 1),
    _entry(("fp64",), None, 4, 8, 16, 32, 4, 1),
)
# Under the interpreter: small blocks, so that the tests' sizes already loop over K, L and H.
INTERPRETER_TABLE = (_entry(("fp32", "fp64"), 16, 2, 4, 16, 16, 4, 1), _entry(("fp32", "fp64"), None, 2, 4, 16, 16, 4, 1))


def table(device: torch.device) -> tuple:
    return GPU_TABLE if device.type == "cuda" else INTERPRETER_TABLE


def precision(dtype) -> str:
    # fp32 tiles as 3xTF32 (tensor cores at about fp32's accuracy: soft gold labels and the
    # weights keep their digits); fp64 as is.
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_supported(unary: torch.Tensor, num_samples: int) -> str | None:
    """None when the kernels take this problem (the table has an entry for every L; K and B
    are looped over), else the reason."""
    dt = unary.dtype if unary.dtype == torch.float64 else torch.float32
    if pick(table(unary.device), dt, unary.shape[1]) is None:
        return f"the Triton SEAL kernels have no configuration for {dt} with L={unary.shape[1]}"
    return None


def _args(unary, probs, labels, weight, seed, samples):
    w1t = weight.t().contiguous()
    explicit = samples is not None
    samp = samples.contiguous() if explicit else unary.new_empty((1,))
    return unary.contiguous(), probs.contiguous(), labels.contiguous(), w1t, samp, explicit, seed.contiguous()


def _constexprs(entry: Entry, dtype) -> dict:
    return dict(EXAMPLES=entry.block("EXAMPLES"), K_CHUNK=entry.block("K_CHUNK"), BLOCK_L=entry.block("BLOCK_L"),
                BLOCK_H=entry.block("BLOCK_H"), ACC=_acc(dtype), PRECISION=precision(dtype))


def _pick(unary):
    entry = pick(table(unary.device), unary.dtype, unary.shape[1])
    if entry is None:
        raise RuntimeError(check_supported(unary, 1))
    return entry


def forward_stats(unary, probs, labels, weight, bias, out, seed, samples, num_samples: int, use_logq: bool):
    """(B, K + 2) = (z_0 .. z_K, LSE) in unary's dtype (float32 or float64)."""
    B, L = unary.shape
    H = weight.shape[0]
    K = num_samples
    stats = torch.empty((B, K + 2), dtype=unary.dtype, device=unary.device)
    if B == 0:
        return stats
    u, p, y, w1t, samp, explicit, seed = _args(unary, probs, labels, weight, seed, samples)
    entry = _pick(unary)
    kw = _constexprs(entry, unary.dtype)
    launch(_nce_fwd_kernel, (triton.cdiv(B, kw["EXAMPLES"]),),
           u, p, y, w1t, bias.contiguous(), out.contiguous(), seed, samp, stats, B, L, H, K,
           USE_LOGQ=use_logq, EXPLICIT=explicit, num_warps=entry.num_warps, num_stages=entry.num_stages, **kw)
    return stats


def backward(unary, probs, labels, weight, bias, out, seed, samples, num_samples: int, use_logq: bool, stats,
             row_weights):
    """structloss_fast::seal_nce_loss_backward_triton: (grad_unary, grad_weight, grad_bias,
    grad_out) of sum_b row_weights[b] * loss_b (log q depends on no parameter: use_logq only
    entered the saved statistics)."""
    B, L = unary.shape
    H = weight.shape[0]
    K = num_samples
    dt = unary.dtype
    dev = unary.device
    du = torch.zeros((B, L), dtype=dt, device=dev)
    if B == 0 or H == 0:
        return du, torch.zeros((H, L), dtype=dt, device=dev), torch.zeros(H, dtype=dt, device=dev), \
            torch.zeros(H, dtype=dt, device=dev)
    u, p, y, w1t, samp, explicit, seed = _args(unary, probs, labels, weight, seed, samples)
    entry = _pick(unary)
    kw = _constexprs(entry, dt)
    ex = kw["EXAMPLES"]
    groups = triton.cdiv(B, ex)
    h_blocks = triton.cdiv(H, kw["BLOCK_H"])
    # enough chunks to fill the GPU (a few programs per SM), within the partials' budget
    want = max(1, 4 * _multiprocessors(dev) // h_blocks) if dev.type == "cuda" else 2
    budget = max(1, PARTIALS_BYTES // max(1, L * H * unary.element_size()))
    n_chunks = max(1, min(groups, want, budget))
    chunk = triton.cdiv(groups, n_chunks) * ex
    n_chunks = triton.cdiv(B, chunk)
    part_w = torch.empty((n_chunks, L, H), dtype=dt, device=dev)
    part_b = torch.empty((n_chunks, H), dtype=dt, device=dev)
    part_c = torch.empty((n_chunks, H), dtype=dt, device=dev)
    launch(_nce_bwd_kernel, (h_blocks, n_chunks),
           u, p, y, w1t, bias.contiguous(), out.contiguous(), seed, samp, stats.contiguous(),
           row_weights.to(dt).contiguous(), du, part_w, part_b, part_c, B, L, H, K, chunk,
           EXPLICIT=explicit, ONE_L_BLOCK=L <= kw["BLOCK_L"], num_warps=entry.num_warps,
           num_stages=entry.num_stages, **kw)
    return du, part_w.sum(0).t().contiguous(), part_b.sum(0), part_c.sum(0)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def bernoulli(probs: torch.Tensor, seed: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(B, K, L) samples in probs' dtype, drawn on the device (no copy to the host)."""
    probs = rows_layout(probs).contiguous()
    B, L = probs.shape
    out = torch.empty((B, num_samples, L), dtype=probs.dtype, device=probs.device)
    if out.numel() == 0:
        return out
    rows, block_l = (16, 16) if probs.device.type != "cuda" else BERNOULLI_BLOCKS
    launch(_bernoulli_kernel, (triton.cdiv(B * num_samples, rows),), probs, seed.contiguous(), out, B, num_samples,
           L, ROWS=rows, BLOCK_L=block_l)
    return out


# ---------------------------------------------------------------- the twin ops' kernels


def forward(unary, probs, labels, weight, bias, out, seed, samples, num_samples: int, use_logq: bool,
            compute_grad: bool):
    """structloss_fast::seal_nce_loss_triton: the compiled op's contract. The Python glue never
    asks it for forward gradients (the backward recomputes them from the seed); when asked, it
    runs the backward kernels with unit weights."""
    stats = forward_stats(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq)
    if compute_grad:
        return (stats,) + backward(unary, probs, labels, weight, bias, out, seed, samples, num_samples, use_logq,
                                   stats, torch.ones_like(stats[:, 0]))
    B, L = unary.shape
    return (stats, unary.new_empty((0, L)), unary.new_empty((0, L)), unary.new_empty((0,)), unary.new_empty((0,)))


# ---------------------------------------------------------------- ahead-of-time compile check


def aot_configs(full: bool = False):
    """The specializations tests/test_triton_build.py compiles for sm_90: every GPU_TABLE entry,
    both kernels, drawing the samples (and, with full=True, reading given ones); the sampler."""
    out = []
    for entry in GPU_TABLE:
        dt = entry.dtypes[0]
        tdt = torch.float64 if dt == "fp64" else torch.float32
        ptrs = {"U": f"*{dt}", "P": f"*{dt}", "Y": f"*{dt}", "W1T": f"*{dt}", "B1": f"*{dt}", "C2": f"*{dt}",
                "SEED": "*i64", "SAMP": f"*{dt}", "STATS": f"*{dt}"}
        sizes = {"B": "i32", "L": "i32", "H": "i32", "K": "i32"}
        consts = _constexprs(entry, tdt)
        divisible = tuple(ptrs) + ("RW", "DU", "PART_W", "PART_B", "PART_C", "H")
        for explicit in (False, True) if full else (False,):
            label = f"{entry.describe()} {'samples given' if explicit else 'samples drawn'}"
            out.append(AotConfig(_nce_fwd_kernel, {**ptrs, **sizes}, {**consts, "USE_LOGQ": True, "EXPLICIT": explicit},
                                 entry.num_warps, entry.num_stages, divisible, label))
            out.append(AotConfig(_nce_bwd_kernel, {**ptrs, "RW": f"*{dt}", "DU": f"*{dt}", "PART_W": f"*{dt}",
                                                   "PART_B": f"*{dt}", "PART_C": f"*{dt}", **sizes, "CHUNK": "i32"},
                                 {**consts, "EXPLICIT": explicit, "ONE_L_BLOCK": entry.max_size is not None},
                                 entry.num_warps, entry.num_stages, divisible, label))
    for dt in ("bf16", "fp16", "fp32", "fp64") if full else ("fp32",):
        out.append(AotConfig(_bernoulli_kernel, {"P": f"*{dt}", "SEED": "*i64", "OUT": f"*{dt}", "B": "i32",
                                                 "K": "i32", "L": "i32"},
                             {"ROWS": BERNOULLI_BLOCKS[0], "BLOCK_L": BERNOULLI_BLOCKS[1]}, 4, 1,
                             ("P", "SEED", "OUT"), f"sampler {dt}"))
    return out

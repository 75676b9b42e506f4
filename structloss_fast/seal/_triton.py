"""Triton kernels of the SEAL fused sample-and-score noise-contrastive loss.

Forward: one program per example draws the K samples into a (K+1) x L tile in registers (row 0 is
the gold vector; the generator is the CPU kernel's Philox4x32-10 with the same counters, so both
backends draw the same samples), scores the tile against C1^T block by block with tl.dot and
writes the K+1 scores and their log-sum-exp: the B x K x L sample tensor never exists.
Backward: programs over (H block, chunk of examples) redraw the tiles and accumulate the
gradient of C1, b1, c2 into per-chunk partials (summed afterwards: deterministic, no atomics);
the programs of the first H block also write the gradient of the unary potentials.
The same code runs on CPU tensors under TRITON_INTERPRET=1, which is how it is tested here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest label count the kernels hold in one tile.
MAX_L = 4096


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
def _label_tile(b, L, K, Y, SAMP, SEED, p, rs, ls, lmask, EXPLICIT: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_K, BLOCK_L) tile: row 0 the gold labels, row k + 1 sample k, zero elsewhere."""
    gold = tl.load(Y + b * L + ls, mask=lmask, other=0.0).to(ACC)
    sample_row = (rs >= 1) & (rs <= K)
    valid = sample_row[:, None] & lmask[None, :]
    if EXPLICIT:
        ks = tl.where(sample_row, rs - 1, 0)
        on = tl.load(SAMP + (b * K + ks[:, None]) * L + ls[None, :], mask=valid, other=0.0).to(ACC)
    else:
        seed = tl.load(SEED)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = tl.zeros((rs.shape[0], ls.shape[0]), dtype=tl.uint32)
        J = (L + 3) // 4  # label l: word l // J of the call with counter l % J
        c0 = zero + (ls % J).to(tl.uint32)[None, :]
        c1 = zero + tl.where(sample_row, rs - 1, 0).to(tl.uint32)[:, None]
        c2 = zero + b  # example index (< 2^31, checked by the launcher): high word 0
        c3 = zero
        r0, r1, r2, r3 = _philox(c0, c1, c2, c3, k0, k1)
        lane = (ls // J)[None, :]
        word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        uniform24 = (word >> 8).to(ACC)
        on = tl.where(valid & (uniform24 < p[None, :] * 16777216.0), 1.0, 0.0).to(ACC)
    return tl.where((rs == 0)[:, None], gold[None, :], on)


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
def _nce_fwd_kernel(U, P, Y, W1T, B1, C2, SEED, SAMP, STATS, L, H, K,
                    USE_LOGQ: tl.constexpr, EXPLICIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_H: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    ls = tl.arange(0, BLOCK_L)
    lmask = ls < L
    rs = tl.arange(0, BLOCK_K)
    rmask = rs <= K
    p = tl.load(P + b * L + ls, mask=lmask, other=0.5).to(ACC)
    u = tl.load(U + b * L + ls, mask=lmask, other=0.0).to(ACC)
    y = _label_tile(b, L, K, Y, SAMP, SEED, p, rs, ls, lmask, EXPLICIT, ACC)
    # log 0 -> -100 (BCELoss's clamp) without evaluating log(0) (the interpreter warns on it)
    lp = tl.where(lmask, tl.where(p == 0.0, -100.0, tl.maximum(tl.log(tl.where(p == 0.0, 1.0, p)), -100.0)), 0.0)
    q = 1.0 - p
    l1p = tl.where(lmask, tl.where(q == 0.0, -100.0, tl.maximum(tl.log(tl.where(q == 0.0, 1.0, q)), -100.0)), 0.0)
    z = tl.sum(y * u[None, :], 1)
    if USE_LOGQ:
        z -= tl.sum(y * lp[None, :] + (1.0 - y) * l1p[None, :], 1)
    z += 0.0 * tl.sum(tl.where(lmask, p, 0.0), 0)  # a NaN probability poisons the loss (even without log q)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        w = tl.load(W1T + ls[:, None] * H + hs[None, :], mask=lmask[:, None] & hmask[None, :], other=0.0)
        b1 = tl.load(B1 + hs, mask=hmask, other=0.0)
        c2 = tl.load(C2 + hs, mask=hmask, other=0.0)
        hid = tl.dot(y, w, input_precision=PRECISION, out_dtype=ACC) + b1[None, :]
        sp, _ = _softplus_sigmoid(hid)
        z += tl.sum(tl.where(hmask[None, :], c2[None, :] * sp, 0.0), 1)
    z = tl.where(rmask, z, float("-inf"))
    m = tl.max(z, 0)
    m_safe = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    lse = m_safe + tl.log(tl.sum(tl.exp(z - m_safe), 0))
    lse = tl.where(m != m, m, lse)
    tl.store(STATS + b * (K + 2) + rs, z, mask=rmask)
    tl.store(STATS + b * (K + 2) + K + 1, lse)


@triton.jit
def _nce_bwd_kernel(U, P, Y, W1T, B1, C2, SEED, SAMP, STATS, RW, DU, PART_W, PART_B, PART_C, B, L, H, K, CHUNK,
                    EXPLICIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
                    ACC: tl.constexpr, PRECISION: tl.constexpr):
    hb = tl.program_id(0)
    c = tl.program_id(1)
    ls = tl.arange(0, BLOCK_L)
    lmask = ls < L
    rs = tl.arange(0, BLOCK_K)
    rmask = rs <= K
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    w = tl.load(W1T + ls[:, None] * H + hs[None, :], mask=lmask[:, None] & hmask[None, :], other=0.0)
    b1 = tl.load(B1 + hs, mask=hmask, other=0.0)
    c2 = tl.load(C2 + hs, mask=hmask, other=0.0)
    acc_w = tl.zeros((BLOCK_L, BLOCK_H), ACC)
    acc_b = tl.zeros((BLOCK_H,), ACC)
    acc_c = tl.zeros((BLOCK_H,), ACC)
    b_end = tl.minimum((c + 1) * CHUNK, B)
    for b in range(c * CHUNK, b_end):
        p = tl.load(P + b * L + ls, mask=lmask, other=0.0).to(ACC)
        y = _label_tile(b, L, K, Y, SAMP, SEED, p, rs, ls, lmask, EXPLICIT, ACC)
        z = tl.load(STATS + b * (K + 2) + rs, mask=rmask, other=float("-inf"))
        lse = tl.load(STATS + b * (K + 2) + K + 1)
        rw = tl.load(RW + b)
        wts = tl.where(rmask, rw * (tl.exp(z - lse) - tl.where(rs == 0, 1.0, 0.0)), 0.0)
        hid = tl.dot(y, w, input_precision=PRECISION, out_dtype=ACC) + b1[None, :]
        sp, sg = _softplus_sigmoid(hid)
        g = tl.where(hmask[None, :], wts[:, None] * c2[None, :] * sg, 0.0)
        acc_w += tl.dot(tl.trans(y), g, input_precision=PRECISION, out_dtype=ACC)
        acc_b += tl.sum(g, 0)
        acc_c += tl.sum(tl.where(hmask[None, :], wts[:, None] * sp, 0.0), 0)
        if hb == 0:
            du = tl.sum(wts[:, None] * y, 0)
            tl.store(DU + b * L + ls, du, mask=lmask)
    out_mask = lmask[:, None] & hmask[None, :]
    tl.store(PART_W + c * L * H + ls[:, None] * H + hs[None, :], acc_w, mask=out_mask)
    tl.store(PART_B + c * H + hs, acc_b, mask=hmask)
    tl.store(PART_C + c * H + hs, acc_c, mask=hmask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(K: int, L: int, H: int, device: torch.device):
    block_k = max(16, triton.next_power_of_2(K + 1))
    block_l = max(16, triton.next_power_of_2(L))
    block_h = 16 if device.type != "cuda" else (64 if block_l <= 256 else 32)
    return block_k, block_l, block_h


def check_supported(unary: torch.Tensor, num_samples: int) -> str | None:
    """None when the kernels take these sizes, else the reason."""
    L = unary.shape[1]
    if L > MAX_L:
        return f"the Triton SEAL kernels hold a sample in one tile and take L <= {MAX_L}, got L={L}"
    if unary.shape[0] >= 2**31:
        return f"the Triton SEAL kernels index examples with 32 bits, got B={unary.shape[0]}"
    if num_samples + 1 > 256:
        return f"the Triton SEAL kernels hold the K + 1 scored vectors in one tile and take K <= 255, got K={num_samples}"
    return None


def _args(unary, probs, labels, weight, seed, samples):
    w1t = weight.t().contiguous()
    explicit = samples is not None
    samp = samples.contiguous() if explicit else unary.new_empty((1,))
    return unary.contiguous(), probs.contiguous(), labels.contiguous(), w1t, samp, explicit, seed.contiguous()


def forward_stats(unary, probs, labels, weight, bias, out, seed, samples, num_samples: int, use_logq: bool):
    """(B, K + 2) = (z_0 .. z_K, LSE) in unary's dtype (float32 or float64)."""
    B, L = unary.shape
    H = weight.shape[0]
    K = num_samples
    stats = torch.empty((B, K + 2), dtype=unary.dtype, device=unary.device)
    if B == 0:
        return stats
    u, p, y, w1t, samp, explicit, seed = _args(unary, probs, labels, weight, seed, samples)
    bk, bl, bh = _blocks(K, L, H, unary.device)
    _nce_fwd_kernel[(B,)](
        u, p, y, w1t, bias.contiguous(), out.contiguous(), seed, samp, stats, L, H, K,
        USE_LOGQ=use_logq, EXPLICIT=explicit, BLOCK_K=bk, BLOCK_L=bl, BLOCK_H=bh, ACC=_acc(unary.dtype),
        PRECISION="ieee", num_warps=4,
    )
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
    bk, bl, bh = _blocks(K, L, H, dev)
    n_chunks = min(B, 64 if dev.type == "cuda" else 2)
    chunk = triton.cdiv(B, n_chunks)
    n_chunks = triton.cdiv(B, chunk)
    part_w = torch.empty((n_chunks, L, H), dtype=dt, device=dev)
    part_b = torch.empty((n_chunks, H), dtype=dt, device=dev)
    part_c = torch.empty((n_chunks, H), dtype=dt, device=dev)
    grid = (triton.cdiv(H, bh), n_chunks)
    _nce_bwd_kernel[grid](
        u, p, y, w1t, bias.contiguous(), out.contiguous(), seed, samp, stats.contiguous(),
        row_weights.to(dt).contiguous(), du, part_w, part_b, part_c, B, L, H, K, chunk,
        EXPLICIT=explicit, BLOCK_K=bk, BLOCK_L=bl, BLOCK_H=bh, ACC=_acc(dt), PRECISION="ieee", num_warps=4,
    )
    return du, part_w.sum(0).t().contiguous(), part_b.sum(0), part_c.sum(0)


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


def aot_configs():
    """(kernel, signature, constexprs, num_warps) of configurations that tests/test_triton_build.py
    compiles for sm_90 without a GPU: both kernels at bibtex's sizes (K = 20, L = 159) in fp32 and
    fp64, drawing the samples and reading them."""
    out = []
    for dt in ("fp32", "fp64"):
        acc = tl.float64 if dt == "fp64" else tl.float32
        bk, bl, bh = _blocks(20, 159, 200, torch.device("cuda"))
        ptrs = {"U": f"*{dt}", "P": f"*{dt}", "Y": f"*{dt}", "W1T": f"*{dt}", "B1": f"*{dt}", "C2": f"*{dt}",
                "SEED": "*i64", "SAMP": f"*{dt}", "STATS": f"*{dt}"}
        for explicit in (False, True):
            consts = dict(EXPLICIT=explicit, BLOCK_K=bk, BLOCK_L=bl, BLOCK_H=bh, ACC=acc, PRECISION="ieee")
            out.append((_nce_fwd_kernel, {**ptrs, "L": "i32", "H": "i32", "K": "i32"}, {**consts, "USE_LOGQ": True}, 4))
            out.append((_nce_bwd_kernel, {**ptrs, "RW": f"*{dt}", "DU": f"*{dt}", "PART_W": f"*{dt}",
                                          "PART_B": f"*{dt}", "PART_C": f"*{dt}", "B": "i32", "L": "i32", "H": "i32",
                                          "K": "i32", "CHUNK": "i32"}, consts, 4))
    return out

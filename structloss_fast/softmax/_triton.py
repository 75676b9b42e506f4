"""Triton kernels of the row-softmax family (Encouraging Loss, margin heads, fused linear).

One program per row walks the row in blocks: an online max / sum-exp of the non-target logits
(the target is merged at the end, so that 1 - p of the target and of the largest class come
from the other classes' sum, without cancellation), the label-smoothing sums when ls > 0, and
the gradient, written during the forward (MODE = FORWARD) or from the saved row statistics
(MODE = MODE_BACKWARD, the recomputing backward). The math is csrc/common/softmax_math.h's, line for line.
The fused linear variant is a loop over row chunks around cuBLAS products in linear_softmax_loss
below: GPU-sized chunks (LINEAR_CHUNK_BYTES of float32 logits), the gradient written in the
input's dtype for the products that follow, and the weight's and bias's gradients accumulated
in place. The launch shapes come from the configuration table (GPU_TABLE). The same code runs
on CPU tensors under TRITON_INTERPRET=1, which is how it is tested here.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._ids import SoftmaxStat, SoftmaxTransform
from .._triton_support import AotConfig, Entry, f64, f64_bits, launch, pick, rows_layout

# Float32 logits of one fused-linear row chunk: 256 MiB on a GPU (C = 128000: 524 rows, so the
# three products per chunk are large enough for the tensor cores), 32 MiB elsewhere (as the CPU
# kernels).
LINEAR_CHUNK_BYTES = {"cuda": 1 << 28, "cpu": 1 << 25}

# The ids of csrc/common/ids.h as compile-time constants of the kernels.
IDENTITY: tl.constexpr = tl.constexpr(int(SoftmaxTransform.IDENTITY))
NORM_FACE: tl.constexpr = tl.constexpr(int(SoftmaxTransform.NORM_FACE))
COS_FACE: tl.constexpr = tl.constexpr(int(SoftmaxTransform.COS_FACE))
ARC_FACE: tl.constexpr = tl.constexpr(int(SoftmaxTransform.ARC_FACE))
CIRCLE_CLASS: tl.constexpr = tl.constexpr(int(SoftmaxTransform.CIRCLE_CLASS))
NUM_STATS: tl.constexpr = tl.constexpr(len(SoftmaxStat))
ST_LSE: tl.constexpr = tl.constexpr(int(SoftmaxStat.LSE))
ST_ROW_LOSS: tl.constexpr = tl.constexpr(int(SoftmaxStat.ROW_LOSS))
ST_S: tl.constexpr = tl.constexpr(int(SoftmaxStat.S))
ST_GRAD_Y: tl.constexpr = tl.constexpr(int(SoftmaxStat.GRAD_Y))
ST_GRAD_HI: tl.constexpr = tl.constexpr(int(SoftmaxStat.GRAD_HI))
ST_MAX_OTHER: tl.constexpr = tl.constexpr(int(SoftmaxStat.MAX_OTHER))
ST_COUNT_MAX: tl.constexpr = tl.constexpr(int(SoftmaxStat.COUNT_MAX))
ST_MAX: tl.constexpr = tl.constexpr(int(SoftmaxStat.MAX))
ST_LOG_SUM: tl.constexpr = tl.constexpr(int(SoftmaxStat.LOG_SUM))
# The kernel's MODE: statistics (and the gradient) in the forward, or the gradient from them.
MODE_FORWARD, MODE_BACKWARD = 0, 1
FORWARD: tl.constexpr = tl.constexpr(MODE_FORWARD)
# The kernel's scalar parameters, in the order of its *_b arguments (derived from the op's
# params in float64 on the host, see _scalars, and passed as exact doubles, f64_bits).
EL_SCALARS = ("log_end", "rho", "ls", "eps", "log_eps", "log1m_le", "inv_1m_le")  # the Encouraging Loss's
SCALARS = EL_SCALARS + ("t0", "t1", "cos_m", "sin_m", "arc_th", "arc_mm")         # ... and the transform's


def _entry(dtypes, max_c, block, warps):
    return Entry(dtypes, max_c, (("BLOCK", block),), warps, 1)


# One program per row, the row walked in BLOCK columns: any C has an entry. Not tuned on a GPU;
# tests/test_triton_build.py compiles each for sm_90.
GPU_TABLE = tuple(
    e for dts in (("bf16", "fp16"), ("fp32",))
    for e in (_entry(dts, 256, 256, 2), _entry(dts, 4096, 2048, 4), _entry(dts, None, 4096, 8))
) + (  # float64: half the block (2048 and 4096 spilled 824 bytes)
    _entry(("fp64",), 256, 256, 2), _entry(("fp64",), 4096, 1024, 4), _entry(("fp64",), None, 2048, 8),
)
# Under the interpreter: small blocks, so that the tests' rows already span several blocks.
INTERPRETER_TABLE = (_entry(("bf16", "fp16", "fp32", "fp64"), None, 32, 4),)


def table(device: torch.device) -> tuple:
    return GPU_TABLE if device.type == "cuda" else INTERPRETER_TABLE


@triton.jit
def _relu(x):
    return tl.where(x < 0.0, 0.0, x)  # NaN stays NaN


@triton.jit
def _other(r, K: tl.constexpr, t0, t1):
    if K == IDENTITY:
        return r
    elif K == CIRCLE_CLASS:
        return t0 * _relu(r + t1) * (r - t1)
    else:
        return t0 * r


@triton.jit
def _other_grad(r, K: tl.constexpr, t0, t1):
    if K == IDENTITY:
        return tl.zeros_like(r) + 1.0
    elif K == CIRCLE_CLASS:
        return t0 * _relu(r + t1)
    else:
        return tl.zeros_like(r) + t0


@triton.jit
def _target(r, K: tl.constexpr, t0, t1, cos_m, sin_m, arc_th, arc_mm):
    if K == IDENTITY:
        return r
    elif K == NORM_FACE:
        return t0 * r
    elif K == COS_FACE:
        return t0 * (r - t1)
    elif K == ARC_FACE:
        c = tl.where(r > 1.0, 1.0, tl.where(r < -1.0, -1.0, r))
        sine = tl.sqrt(tl.where(1.0 - c * c < 0.0, 0.0, 1.0 - c * c))
        return t0 * tl.where(c >= arc_th, c * cos_m - sine * sin_m, c - arc_mm)
    else:
        return t0 * _relu(1.0 + t1 - r) * (r - (1.0 - t1))


@triton.jit
def _target_grad(r, K: tl.constexpr, t0, t1, cos_m, sin_m, arc_th, arc_mm):
    if K == IDENTITY:
        return tl.zeros_like(r) + 1.0
    elif K == ARC_FACE:
        sine = tl.sqrt(tl.where(1.0 - r * r < 0.0, 0.0, 1.0 - r * r))
        inside = (r <= 1.0) & (r >= -1.0)
        g = tl.where(r >= arc_th, t0 * (cos_m + sin_m * r / sine), tl.zeros_like(r) + t0)
        return tl.where(inside, g, 0.0)
    elif K == CIRCLE_CLASS:
        return t0 * _relu(1.0 + t1 - r)
    else:
        return tl.zeros_like(r) + t0


@triton.jit
def _bonus(p, q, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE: tl.constexpr):
    """(b, h, h q) of one class from an accurate (p, q = 1 - p)."""
    clamped = ~(q >= eps)
    qs = tl.where(clamped, 1.0, q)
    b = tl.where(clamped, log_eps, tl.log(qs))
    h = tl.where(clamped, 1.0, 1.0 + rho * p / qs)
    hq = tl.where(clamped, q, q + rho * p)
    if HAS_LE:
        cons = p > log_end
        b = tl.where(cons, log1m_le - (p - log_end) * inv_1m_le, b)
        h = tl.where(cons, 1.0 + rho * p * inv_1m_le, h)
        hq = tl.where(cons, q * (1.0 + rho * p * inv_1m_le), hq)
    return b, h, hq


@triton.jit
def _small_class_terms(p, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE: tl.constexpr):
    """(b, h) of classes with p <= 1/2 (all but the largest): log(1 - p) as Kahan's log1p."""
    q = 1.0 - p
    clamped = ~(q >= eps)
    qs = tl.where(clamped, 1.0, q)
    log1p_neg = tl.where(q == 1.0, -p, tl.log(qs) * (-p) / tl.where(q == 1.0, 1.0, q - 1.0))
    b = tl.where(clamped, log_eps, log1p_neg)
    h = tl.where(clamped, 1.0, 1.0 + rho * p / qs)
    if HAS_LE:
        cons = p > log_end
        b = tl.where(cons, log1m_le - (p - log_end) * inv_1m_le, b)
        h = tl.where(cons, 1.0 + rho * p * inv_1m_le, h)
    return b, h


@triton.jit
def _online_max_sumexp(z, valid, m, s_below, n, ACC: tl.constexpr):
    """One block of the online max / sum-exp: z (-inf where not valid) merged into the running
    max m, the sum of exp(z - m) below it, and the count n of entries at it (kept apart so that
    the largest class's 1 - p is formed from the others' sum)."""
    bmax = tl.max(z, 0)
    grow = bmax > m
    s_below = tl.where(grow, (s_below + n.to(ACC)) * tl.exp(m - tl.where(grow, bmax, m)), s_below)
    n = tl.where(grow, 0, n)
    m = tl.where(grow, bmax, m)
    shift = tl.where(m == float("-inf"), 0.0, m)
    at = (z == m) & valid
    s_below += tl.sum(tl.where(at, 0.0, tl.exp(z - shift)), 0)
    n += tl.sum(at.to(tl.int32), 0)
    return m, s_below, n


@triton.jit
def _el_scalars(log_end_b, rho_b, ls_b, eps_b, log_eps_b, log1m_le_b, inv_1m_le_b, ACC: tl.constexpr):
    """The Encouraging Loss's scalars, passed as the bits of doubles (f64_bits): exact in the
    float64 path."""
    return (f64(log_end_b).to(ACC), f64(rho_b).to(ACC), f64(ls_b).to(ACC), f64(eps_b).to(ACC),
            f64(log_eps_b).to(ACC), f64(log1m_le_b).to(ACC), f64(inv_1m_le_b).to(ACC))


@triton.jit
def _store_stats(st, L, loss, S, g_y, g_hi, m_o, n_o, mx, log_s, ACC: tl.constexpr):
    """One row's SoftmaxStat columns."""
    tl.store(st + ST_LSE, L)
    tl.store(st + ST_ROW_LOSS, loss)
    tl.store(st + ST_S, S)
    tl.store(st + ST_GRAD_Y, g_y)
    tl.store(st + ST_GRAD_HI, g_hi)
    tl.store(st + ST_MAX_OTHER, m_o)
    tl.store(st + ST_COUNT_MAX, n_o.to(ACC))
    tl.store(st + ST_MAX, mx)
    tl.store(st + ST_LOG_SUM, log_s)


@triton.jit
def _el_row_kernel(X, Y, CW, STATS, G, RS, stride_x, stride_g, stride_rs, C, ignore_index, log_end_b, rho_b, ls_b,
                   eps_b, log_eps_b, log1m_le_b, inv_1m_le_b, t0_b, t1_b, cos_m_b, sin_m_b, arc_th_b, arc_mm_b,
                   K: tl.constexpr, MODE: tl.constexpr, HAS_LE: tl.constexpr, LS: tl.constexpr,
                   HAS_W: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Scalar parameters arrive as the bits of doubles (f64_bits): exact in the float64 path.
    log_end, rho, ls, eps, log_eps, log1m_le, inv_1m_le = _el_scalars(
        log_end_b, rho_b, ls_b, eps_b, log_eps_b, log1m_le_b, inv_1m_le_b, ACC)
    t0 = f64(t0_b).to(ACC)
    t1 = f64(t1_b).to(ACC)
    cos_m = f64(cos_m_b).to(ACC)
    sin_m = f64(sin_m_b).to(ACC)
    arc_th = f64(arc_th_b).to(ACC)
    arc_mm = f64(arc_mm_b).to(ACC)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(Y + row)
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= C)) & (~ignored)
    y_safe = tl.where(ignored | bad, 0, y)
    raw_y = tl.load(x_row + y_safe).to(ACC)
    if HAS_W:
        wy = tl.load(CW + y_safe).to(ACC)
    else:
        wy = tl.zeros_like(raw_y) + 1.0
    offs = tl.arange(0, BLOCK)
    lsC = ls / C
    st = STATS + row * NUM_STATS
    if MODE == FORWARD:
        # ---- phase 1: online max / sum-exp of the non-target logits
        m_o = tl.full((), float("-inf"), ACC)
        s_below = tl.zeros((), ACC)
        n_o = tl.zeros((), tl.int32)
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            ok = cols < C
            valid = ok & (cols != y)
            r = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC)
            z = tl.where(valid, _other(r, K, t0, t1), float("-inf"))
            m_o, s_below, n_o = _online_max_sumexp(z, valid, m_o, s_below, n_o, ACC)
        # ---- merge the target, L, p and q without cancellation
        z_y = _target(raw_y, K, t0, t1, cos_m, sin_m, arc_th, arc_mm)
        mx = tl.where(z_y > m_o, z_y, m_o)
        scale_o = tl.exp(m_o - mx)
        e_o = (s_below + n_o.to(ACC)) * scale_o
        e_y = tl.exp(z_y - mx)
        s_all = e_o + e_y
        log_s = tl.log(s_all)
        L = mx + log_s
        p_y = e_y / s_all
        q_y = e_o / s_all
        has_hi = n_o == 1
        p_hi = scale_o / s_all
        q_hi = (s_below * scale_o + e_y) / s_all
        b_y, h_y, hq_y = _bonus(p_y, q_y, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
        f_y = ((mx - z_y) + log_s) + rho * b_y
        why = wy * h_y
        if LS:
            # ---- phase 2: label-smoothing sums over the classes other than y and the largest
            a_acc = tl.zeros((BLOCK,), ACC)
            f_acc = tl.zeros((BLOCK,), ACC)
            whi_acc = tl.zeros((BLOCK,), ACC)
            for c0 in range(0, C, BLOCK):
                cols = c0 + offs
                ok = cols < C
                valid = ok & (cols != y)
                r = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC)
                z = _other(r, K, t0, t1)
                d = (z - mx) - log_s
                p = tl.exp(d)
                b, h = _small_class_terms(p, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
                if HAS_W:
                    w = tl.load(CW + cols, mask=ok, other=0.0).to(ACC)
                else:
                    w = tl.zeros_like(r) + 1.0
                hi = has_hi & (z == m_o) & valid
                small = valid & (~hi)
                a_acc += tl.where(small, w * h, 0.0)
                f_acc += tl.where(small, w * (rho * b - d), 0.0)
                whi_acc += tl.where(hi, w, 0.0)
            a_rest = tl.sum(a_acc, 0)
            f_rest = tl.sum(f_acc, 0)
            w_hi = tl.sum(whi_acc, 0)
            b_hi, h_hi, hq_hi = _bonus(p_hi, q_hi, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
            f_hi = ((mx - m_o) + log_s) + rho * b_hi
            sum_wh = a_rest + tl.where(has_hi, w_hi * h_hi, 0.0)
            S = (1.0 - ls) * why + lsC * (why + sum_wh)
            g_y = -((1.0 - ls) + lsC) * wy * hq_y + p_y * lsC * sum_wh
            g_hi = tl.where(has_hi, p_hi * ((1.0 - ls) * why + lsC * (why + a_rest)) - lsC * w_hi * hq_hi, 0.0)
            loss = (1.0 - ls) * wy * f_y + lsC * (wy * f_y + f_rest + tl.where(has_hi, w_hi * f_hi, 0.0))
        else:
            S = why
            g_y = -wy * hq_y
            g_hi = tl.zeros_like(S)
            loss = wy * f_y
        nan = float("nan")
        zero = tl.zeros_like(loss)
        L = tl.where(ignored, zero, tl.where(bad, nan, L))
        loss = tl.where(ignored, zero, tl.where(bad, nan, loss))
        S = tl.where(ignored, zero, S)
        g_y = tl.where(ignored, zero, g_y)
        g_hi = tl.where(ignored, zero, g_hi)
        m_o = tl.where(ignored, zero, m_o)
        n_o = tl.where(ignored, 0, n_o)
        mx = tl.where(ignored, zero, mx)
        log_s = tl.where(ignored, zero, log_s)
        _store_stats(st, L, loss, S, g_y, g_hi, m_o, n_o, mx, log_s, ACC)
    else:
        S = tl.load(st + ST_S).to(ACC)
        mx = tl.load(st + ST_MAX).to(ACC)
        log_s = tl.load(st + ST_LOG_SUM).to(ACC)
        g_y = tl.load(st + ST_GRAD_Y).to(ACC)
        g_hi = tl.load(st + ST_GRAD_HI).to(ACC)
        m_o = tl.load(st + ST_MAX_OTHER).to(ACC)
        has_hi = tl.load(st + ST_COUNT_MAX).to(tl.int32) == 1
    if WRITE_GRAD:
        # ---- phase 3: the gradient, scaled by the row's weight
        sc = tl.load(RS + row * stride_rs).to(ACC)
        tg = g_y * _target_grad(raw_y, K, t0, t1, cos_m, sin_m, arc_th, arc_mm)
        g_row = G + row * stride_g
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            ok = cols < C
            r = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC)
            z = _other(r, K, t0, t1)
            p = tl.exp((z - mx) - log_s)
            if LS:
                _, h = _small_class_terms(p, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
                if HAS_W:
                    w = tl.load(CW + cols, mask=ok, other=0.0).to(ACC)
                else:
                    w = tl.zeros_like(r) + 1.0
                g = tl.where(has_hi & (z == m_o), g_hi, p * S - lsC * w * h)
            else:
                g = p * S
            if K != IDENTITY:
                g = g * _other_grad(r, K, t0, t1)
            g = tl.where(cols == y, tg, g) * sc
            g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=ok)


@triton.jit
def _el_prob_row_kernel(X, T, CW, STATS, G, RS, stride_x, stride_t, stride_g, stride_rs, C, log_end_b, rho_b, ls_b,
                        eps_b, log_eps_b, log1m_le_b, inv_1m_le_b,
                        MODE: tl.constexpr, HAS_LE: tl.constexpr, HAS_W: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Class-probability targets T (rows x C, identity transform): the row loss sum_j c_j f_j with
    c_j = w_j ((1 - ls) t_j + ls / C), the gradient p_j S - c_j h_j; the unique largest logit takes
    its q from the other classes' sum (csrc/cpu/softmax.cpp's prob rows, line for line)."""
    log_end, rho, ls, eps, log_eps, log1m_le, inv_1m_le = _el_scalars(
        log_end_b, rho_b, ls_b, eps_b, log_eps_b, log1m_le_b, inv_1m_le_b, ACC)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK)
    keep = 1.0 - ls
    lsC = ls / C
    st = STATS + row * NUM_STATS
    if MODE == FORWARD:
        mx = tl.full((), float("-inf"), ACC)
        s_below = tl.zeros((), ACC)
        n_m = tl.zeros((), tl.int32)
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            ok = cols < C
            z = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(ACC)
            mx, s_below, n_m = _online_max_sumexp(z, ok, mx, s_below, n_m, ACC)
        s_all = s_below + n_m.to(ACC)
        log_s = tl.log(s_all)
        has_hi = n_m == 1
        a_acc = tl.zeros((BLOCK,), ACC)
        f_acc = tl.zeros((BLOCK,), ACC)
        c_acc = tl.zeros((BLOCK,), ACC)
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            ok = cols < C
            z = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC)
            t = tl.load(t_row + cols, mask=ok, other=0.0).to(ACC)
            d = (z - mx) - log_s
            b, h = _small_class_terms(tl.exp(d), log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
            if HAS_W:
                w = tl.load(CW + cols, mask=ok, other=0.0).to(ACC)
            else:
                w = tl.zeros_like(z) + 1.0
            c = w * (keep * t + lsC)
            hi = has_hi & (z == mx) & ok
            small = ok & (~hi)
            a_acc += tl.where(small, c * h, 0.0)
            f_acc += tl.where(small, c * (rho * b - d), 0.0)
            c_acc += tl.where(hi, c, 0.0)
        sum_ch = tl.sum(a_acc, 0)
        c_hi = tl.sum(c_acc, 0)
        p_hi = 1.0 / s_all
        q_hi = s_below / s_all
        b_hi, h_hi, hq_hi = _bonus(p_hi, q_hi, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
        S = sum_ch + tl.where(has_hi, c_hi * h_hi, 0.0)
        g_hi = tl.where(has_hi, p_hi * sum_ch - c_hi * hq_hi, 0.0)
        loss = tl.sum(f_acc, 0) + tl.where(has_hi, c_hi * (log_s + rho * b_hi), 0.0)
        _store_stats(st, mx + log_s, loss, S, tl.zeros_like(S), g_hi, mx, n_m, mx, log_s, ACC)
    else:
        S = tl.load(st + ST_S).to(ACC)
        mx = tl.load(st + ST_MAX).to(ACC)
        log_s = tl.load(st + ST_LOG_SUM).to(ACC)
        g_hi = tl.load(st + ST_GRAD_HI).to(ACC)
        has_hi = tl.load(st + ST_COUNT_MAX).to(tl.int32) == 1
    if WRITE_GRAD:
        sc = tl.load(RS + row * stride_rs).to(ACC)
        g_row = G + row * stride_g
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            ok = cols < C
            z = tl.load(x_row + cols, mask=ok, other=0.0).to(ACC)
            t = tl.load(t_row + cols, mask=ok, other=0.0).to(ACC)
            p = tl.exp((z - mx) - log_s)
            _, h = _small_class_terms(p, log_end, rho, eps, log_eps, log1m_le, inv_1m_le, HAS_LE)
            if HAS_W:
                w = tl.load(CW + cols, mask=ok, other=0.0).to(ACC)
            else:
                w = tl.zeros_like(z) + 1.0
            g = tl.where(has_hi & (z == mx), g_hi, p * S - w * (keep * t + lsC) * h)
            tl.store(g_row + cols, (g * sc).to(G.dtype.element_ty), mask=ok)


def _scalars(transform: int, params):
    log_end, rho, ls, eps, t0, t1 = (float(p) for p in params)
    has_le = log_end < 1.0
    return dict(
        log_end=log_end, rho=rho, ls=ls, eps=eps, log_eps=math.log(eps),
        log1m_le=math.log1p(-log_end) if has_le else 0.0, inv_1m_le=1.0 / (1.0 - log_end) if has_le else 0.0,
        t0=t0, t1=t1, cos_m=math.cos(t1), sin_m=math.sin(t1), arc_th=math.cos(math.pi - t1),
        arc_mm=t1 * math.sin(t1),
    ), has_le, ls > 0


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_supported(logits: torch.Tensor) -> str | None:
    """None when the kernel takes rows of this dtype and length (the table has an entry for
    any C in every floating dtype), else the reason."""
    if pick(table(logits.device), logits.dtype, logits.shape[-1]) is None:
        return f"the Triton row-softmax kernel has no configuration for {logits.dtype} rows of {logits.shape[-1]} classes"
    return None


def _launch(x, target, class_weight, stats, grad, row_scale, ignore_index, transform, params, mode):
    N, C = x.shape
    if N == 0:
        return
    sc, has_le, has_ls = _scalars(transform, params)
    acc = _acc(x.dtype)
    entry = pick(table(x.device), x.dtype, C)
    if entry is None:
        raise RuntimeError(check_supported(x))
    cw = class_weight.to(acc).contiguous() if class_weight is not None else stats  # placeholder when absent
    write = grad is not None
    g = grad if write else x
    rs = row_scale if row_scale is not None else stats
    stride_rs = row_scale.stride(0) if row_scale is not None and row_scale.dim() == 1 and row_scale.shape[0] > 1 else 0
    if target.dim() == 2:  # class probabilities (identity transform, checked by the caller)
        t = rows_layout(target.to(x.dtype))
        launch(
            _el_prob_row_kernel, (N,),
            x, t, cw, stats, g, rs, x.stride(0), t.stride(0), g.stride(0) if write else 0, stride_rs, C,
            *(f64_bits(sc[k]) for k in EL_SCALARS),
            MODE=mode, HAS_LE=has_le, HAS_W=class_weight is not None, WRITE_GRAD=write,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=entry.block("BLOCK"),
            num_warps=entry.num_warps, num_stages=entry.num_stages,
        )
        return
    launch(
        _el_row_kernel, (N,),
        x, target, cw, stats, g, rs, x.stride(0), g.stride(0) if write else 0, stride_rs, C, ignore_index, *(f64_bits(sc[k]) for k in SCALARS),
        K=transform, MODE=mode, HAS_LE=has_le, LS=has_ls, HAS_W=class_weight is not None, WRITE_GRAD=write,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=entry.block("BLOCK"),
        num_warps=entry.num_warps, num_stages=entry.num_stages,
    )


def forward(logits, target, class_weight, ignore_index, transform, params, compute_grad):
    """structloss_fast::softmax_loss_triton: (row_stats, grad_logits), the compiled op's contract."""
    x = rows_layout(logits)
    N, C = x.shape
    acc = _acc(x.dtype)
    stats = torch.empty((N, len(SoftmaxStat)), dtype=acc, device=x.device)
    grad = torch.empty((N if compute_grad else 0, C), dtype=x.dtype, device=x.device)
    # The gradient buffer holds each row's own gradient; the backward applies the row weights.
    scale = torch.ones((1,), dtype=acc, device=x.device)
    _launch(x, target.contiguous(), class_weight, stats, grad if compute_grad else None, scale, ignore_index,
            transform, params, MODE_FORWARD)
    return stats, grad


def backward(logits, target, class_weight, row_stats, row_weights, ignore_index, transform, params):
    """structloss_fast::softmax_loss_backward_triton."""
    x = rows_layout(logits)
    acc = _acc(x.dtype)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, target.contiguous(), class_weight, row_stats.to(acc).contiguous(), grad,
            row_weights.to(acc).contiguous(), ignore_index, transform, params, MODE_BACKWARD)
    return grad


# ---------------------------------------------------------------- fused linear


# cuBLAS' fp16/bf16 products with a float32 result added in place (torch >= 2.8 on CUDA).
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def _tensor_cores(t: torch.Tensor) -> bool:
    """fp16/bf16 operands on the GPU: the products keep their dtype (float32 results)."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def _mm_into(out, a, b, accumulate: bool):
    """out (+)= a @ b in out's dtype (float32 or float64) without a temporary of out's size:
    fp16/bf16 operands on the GPU go to the tensor cores as they are, others are widened."""
    if _tensor_cores(a):
        b = b.to(a.dtype)
        if not accumulate:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        elif _ADDMM_OUT_DTYPE:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            out += torch.mm(a, b, out_dtype=out.dtype)
        return
    a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def chunk_rows(N: int, C: int, dtype, device: torch.device, row_chunk: int = 0) -> int:
    """Rows per fused-linear chunk: the caller's, or LINEAR_CHUNK_BYTES of logits."""
    per_row = max(C, 1) * torch.finfo(_acc(dtype)).bits // 8
    rows = row_chunk if row_chunk > 0 else LINEAR_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"] // per_row
    return max(1, min(rows, N))


def _linear_loop(input, weight, bias, target, class_weight, ignore_index, transform, params, grad_mask, row_chunk,
                 stats, row_scale, mode):
    N, H = input.shape
    C = weight.shape[0]
    acc = _acc(input.dtype)
    dev = input.device
    rows = chunk_rows(N, C, input.dtype, dev, row_chunk)
    want = any(grad_mask)
    gx = torch.zeros((N if grad_mask[0] else 0, H), dtype=acc, device=dev)
    gw = torch.zeros((C if grad_mask[1] else 0, H), dtype=acc, device=dev)
    gb = torch.zeros((C if grad_mask[2] and bias is not None else 0,), dtype=acc, device=dev)
    if N == 0:
        return gx.to(input.dtype), gw.to(input.dtype), gb.to(input.dtype)
    wt = weight.t()
    bias_acc = bias.to(acc) if bias is not None else None
    # One logits buffer for every chunk; the gradient goes to a buffer in the products' dtype
    # (fp16/bf16 on the GPU), else over the logits.
    logits_buf = torch.empty((rows, C), dtype=acc, device=dev)
    grad_buf = torch.empty((rows, C), dtype=input.dtype, device=dev) if want and _tensor_cores(input) else logits_buf
    for r0 in range(0, N, rows):
        t = min(rows, N - r0)
        xc = input[r0:r0 + t]
        logits = logits_buf[:t]
        _mm_into(logits, xc, wt, accumulate=False)
        if bias_acc is not None:
            logits += bias_acc
        rs = row_scale if row_scale.shape[0] == 1 else row_scale[r0:r0 + t]
        g = grad_buf[:t]
        _launch(logits, target[r0:r0 + t], class_weight, stats[r0:r0 + t], g if want else None, rs,
                ignore_index, transform, params, mode)
        if not want:
            continue
        if grad_mask[0]:
            _mm_into(gx[r0:r0 + t], g, weight, accumulate=False)
        if grad_mask[1]:
            _mm_into(gw, g.t(), xc, accumulate=True)
        if grad_mask[2] and bias is not None:
            gb += g.sum(0, dtype=acc)
    dt = input.dtype
    return gx.to(dt), gw.to(dt), gb.to(dt)


def linear_forward(input, weight, bias, target, class_weight, ignore_index, transform, params, grad_mask, row_chunk,
                   class_tile):
    """structloss_fast::linear_softmax_loss_triton: (row_stats, grad_input, grad_weight,
    grad_bias), the gradients those of the unit-weight sum of the row losses. Row chunks only:
    class_tile is not used on this path (the CPU kernels tile classes)."""
    N = input.shape[0]
    acc = _acc(input.dtype)
    stats = torch.empty((N, len(SoftmaxStat)), dtype=acc, device=input.device)
    scale = torch.ones((1,), dtype=acc, device=input.device)
    gx, gw, gb = _linear_loop(input, weight, bias, target.contiguous(), class_weight, ignore_index, transform, params,
                              grad_mask, row_chunk, stats, scale, MODE_FORWARD)
    return stats, gx, gw, gb


def linear_backward(input, weight, bias, target, class_weight, row_stats, row_weights, ignore_index, transform, params,
                    grad_mask, row_chunk, class_tile):
    """structloss_fast::linear_softmax_loss_backward_triton."""
    acc = _acc(input.dtype)
    stats = row_stats.to(acc).contiguous()
    return _linear_loop(input, weight, bias, target.contiguous(), class_weight, ignore_index, transform, params,
                        grad_mask, row_chunk, stats, row_weights.to(acc).contiguous(), MODE_BACKWARD)


# ---------------------------------------------------------------- ahead-of-time compile check


def aot_configs(full: bool = False):
    """The specializations tests/test_triton_build.py compiles for sm_90: every GPU_TABLE entry
    with the heaviest flags (ArcFace target, label smoothing, class weights, a log_end) in the
    forward mode, in the entry's first dtype, plus the fused linear chunk's float32 logits with
    a 16-bit gradient on the float32 entries; with full=True every dtype, transform and mode."""
    out = []
    for entry in GPU_TABLE:
        for dt in entry.dtypes if full else entry.dtypes[:1]:
            acc = "fp64" if dt == "fp64" else "fp32"
            grads = [dt] + (["bf16"] + (["fp16"] if full else []) if dt == "fp32" else [])
            for g_dtype in grads:
                sig = {"X": f"*{dt}", "Y": "*i64", "CW": f"*{acc}", "STATS": f"*{acc}", "G": f"*{g_dtype}",
                       "RS": f"*{acc}", "stride_x": "i32", "stride_g": "i32", "stride_rs": "i32", "C": "i32",
                       "ignore_index": "i32", **{f"{k}_b": "i64" for k in SCALARS}}
                for transform in SoftmaxTransform if full else (SoftmaxTransform.ARC_FACE,):
                    for mode in (MODE_FORWARD, MODE_BACKWARD) if full else (MODE_FORWARD,):
                        consts = dict(K=int(transform), MODE=mode, HAS_LE=True, LS=True, HAS_W=True, WRITE_GRAD=True,
                                      ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=entry.block("BLOCK"))
                        label = (f"{entry.describe()} logits={dt} grad={g_dtype} "
                                 f"transform={SoftmaxTransform(transform).name.lower()} mode={mode}")
                        out.append(AotConfig(_el_row_kernel, sig, consts, entry.num_warps, entry.num_stages,
                                             ("X", "Y", "CW", "STATS", "G", "RS", "stride_x", "stride_g", "C"), label))
            # class-probability targets (identity transform)
            sig = {"X": f"*{dt}", "T": f"*{dt}", "CW": f"*{acc}", "STATS": f"*{acc}", "G": f"*{dt}", "RS": f"*{acc}",
                   "stride_x": "i32", "stride_t": "i32", "stride_g": "i32", "stride_rs": "i32", "C": "i32",
                   **{f"{k}_b": "i64" for k in EL_SCALARS}}
            consts = dict(MODE=MODE_FORWARD, HAS_LE=True, HAS_W=True, WRITE_GRAD=True,
                          ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=entry.block("BLOCK"))
            out.append(AotConfig(_el_prob_row_kernel, sig, consts, entry.num_warps, entry.num_stages,
                                 ("X", "T", "CW", "STATS", "G", "RS", "stride_x", "stride_t", "stride_g", "C"),
                                 f"{entry.describe()} logits={dt} class-probability targets"))
    return out

"""Triton kernels of the row-softmax family (Encouraging Loss, margin heads, fused linear).

One program per row walks the row in blocks: an online max / sum-exp of the non-target logits
(the target is merged at the end, so that 1 - p of the target and of the largest class come
from the other classes' sum, without cancellation), the label-smoothing sums when ls > 0, and
the gradient, written during the forward (MODE = FORWARD) or from the saved row statistics
(MODE = MODE_BACKWARD, the recomputing backward). The math is csrc/common/softmax_math.h's, line for line.
The fused linear variant is a loop over row chunks around cuBLAS products in linear_softmax_loss
below. The same code runs on CPU tensors under TRITON_INTERPRET=1, which is how it is tested
here.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._ids import SoftmaxStat, SoftmaxTransform

# Logits elements of one fused-linear row chunk (float32): 32 MiB, as the CPU kernels.
CHUNK_ELEMS = 1 << 23

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
# The kernel's scalar parameters, in the order of its P tensor (derived from the op's params
# in float64 on the host, see _scalars).
SCALARS = ("log_end", "rho", "ls", "eps", "log_eps", "log1m_le", "inv_1m_le", "t0", "t1", "cos_m", "sin_m", "arc_th",
           "arc_mm")
P_LOG_END: tl.constexpr = tl.constexpr(SCALARS.index("log_end"))
P_RHO: tl.constexpr = tl.constexpr(SCALARS.index("rho"))
P_LS: tl.constexpr = tl.constexpr(SCALARS.index("ls"))
P_EPS: tl.constexpr = tl.constexpr(SCALARS.index("eps"))
P_LOG_EPS: tl.constexpr = tl.constexpr(SCALARS.index("log_eps"))
P_LOG1M_LE: tl.constexpr = tl.constexpr(SCALARS.index("log1m_le"))
P_INV_1M_LE: tl.constexpr = tl.constexpr(SCALARS.index("inv_1m_le"))
P_T0: tl.constexpr = tl.constexpr(SCALARS.index("t0"))
P_T1: tl.constexpr = tl.constexpr(SCALARS.index("t1"))
P_COS_M: tl.constexpr = tl.constexpr(SCALARS.index("cos_m"))
P_SIN_M: tl.constexpr = tl.constexpr(SCALARS.index("sin_m"))
P_ARC_TH: tl.constexpr = tl.constexpr(SCALARS.index("arc_th"))
P_ARC_MM: tl.constexpr = tl.constexpr(SCALARS.index("arc_mm"))


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
def _el_scalars(P):
    """The Encouraging Loss's scalars from the P tensor (see _scalars)."""
    return (tl.load(P + P_LOG_END), tl.load(P + P_RHO), tl.load(P + P_LS), tl.load(P + P_EPS), tl.load(P + P_LOG_EPS),
            tl.load(P + P_LOG1M_LE), tl.load(P + P_INV_1M_LE))


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
def _el_row_kernel(X, Y, CW, STATS, G, RS, P, stride_x, stride_g, stride_rs, C, ignore_index,
                   K: tl.constexpr, MODE: tl.constexpr, HAS_LE: tl.constexpr, LS: tl.constexpr,
                   HAS_W: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Scalar parameters come from a tensor in the accumulation dtype: Python floats would be
    # passed as float32, which is not exact enough for the float64 path.
    log_end, rho, ls, eps, log_eps, log1m_le, inv_1m_le = _el_scalars(P)
    t0 = tl.load(P + P_T0)
    t1 = tl.load(P + P_T1)
    cos_m = tl.load(P + P_COS_M)
    sin_m = tl.load(P + P_SIN_M)
    arc_th = tl.load(P + P_ARC_TH)
    arc_mm = tl.load(P + P_ARC_MM)
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
def _el_prob_row_kernel(X, T, CW, STATS, G, RS, P, stride_x, stride_t, stride_g, stride_rs, C,
                        MODE: tl.constexpr, HAS_LE: tl.constexpr, HAS_W: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Class-probability targets T (rows x C, identity transform): the row loss sum_j c_j f_j with
    c_j = w_j ((1 - ls) t_j + ls / C), the gradient p_j S - c_j h_j; the unique largest logit takes
    its q from the other classes' sum (csrc/cpu/softmax.cpp's prob rows, line for line)."""
    log_end, rho, ls, eps, log_eps, log1m_le, inv_1m_le = _el_scalars(P)
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


def _block(C: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cuda" else 32  # interpreter: small blocks exercise the block loop
    return max(16, min(triton.next_power_of_2(max(C, 1)), cap))


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


def _launch(x, target, class_weight, stats, grad, row_scale, ignore_index, transform, params, mode):
    N, C = x.shape
    if N == 0:
        return
    sc, has_le, has_ls = _scalars(transform, params)
    acc = _acc(x.dtype)
    cw = class_weight.to(acc).contiguous() if class_weight is not None else x  # placeholder when absent
    write = grad is not None
    g = grad if write else x
    rs = row_scale if row_scale is not None else x
    p = torch.tensor([sc[k] for k in SCALARS], dtype=acc, device=x.device)
    stride_rs = row_scale.stride(0) if row_scale is not None and row_scale.dim() == 1 and row_scale.shape[0] > 1 else 0
    if target.dim() == 2:  # class probabilities (identity transform, checked by the caller)
        t = target.to(x.dtype).contiguous()
        _el_prob_row_kernel[(N,)](
            x, t, cw, stats, g, rs, p, x.stride(0), t.stride(0), g.stride(0) if write else 0, stride_rs, C,
            MODE=mode, HAS_LE=has_le, HAS_W=class_weight is not None, WRITE_GRAD=write,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_block(C, x.device),
            num_warps=8 if x.device.type == "cuda" and C >= 8192 else 4,
        )
        return
    _el_row_kernel[(N,)](
        x, target, cw, stats, g, rs, p, x.stride(0), g.stride(0) if write else 0,
        row_scale.stride(0) if row_scale is not None and row_scale.dim() == 1 and row_scale.shape[0] > 1 else 0,
        C, ignore_index,
        K=transform, MODE=mode, HAS_LE=has_le, LS=has_ls, HAS_W=class_weight is not None, WRITE_GRAD=write,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_block(C, x.device),
        num_warps=8 if x.device.type == "cuda" and C >= 8192 else 4,
    )


def forward(logits, target, class_weight, ignore_index, transform, params, compute_grad):
    """structloss_fast::softmax_loss_triton: (row_stats, grad_logits), the compiled op's contract."""
    x = logits.contiguous()
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
    x = logits.contiguous()
    acc = _acc(x.dtype)
    grad = torch.empty_like(x)
    _launch(x, target.contiguous(), class_weight, row_stats.to(acc).contiguous(), grad,
            row_weights.to(acc).contiguous(), ignore_index, transform, params, MODE_BACKWARD)
    return grad


# ---------------------------------------------------------------- fused linear


def _mm_acc(a, b, acc):
    """a @ b with float32 (float64) accumulation and output; fp16/bf16 operands stay in their
    dtype on the GPU (tensor cores, float32 output), and are widened elsewhere."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)
    return torch.mm(a.to(acc), b.to(acc))


def _linear_loop(input, weight, bias, target, class_weight, ignore_index, transform, params, grad_mask, row_chunk,
                 stats, row_scale, mode):
    N, H = input.shape
    C = weight.shape[0]
    acc = _acc(input.dtype)
    rows = row_chunk if row_chunk > 0 else max(1, CHUNK_ELEMS // max(C, 1))
    rows = max(1, min(rows, N))
    want = any(grad_mask)
    gx = torch.zeros((N if grad_mask[0] else 0, H), dtype=acc, device=input.device)
    gw = torch.zeros((C if grad_mask[1] else 0, H), dtype=acc, device=input.device)
    gb = torch.zeros((C if grad_mask[2] and bias is not None else 0,), dtype=acc, device=input.device)
    wt = weight.t()
    for r0 in range(0, N, rows):
        t = min(rows, N - r0)
        xc = input[r0:r0 + t]
        logits = _mm_acc(xc, wt, acc)
        if bias is not None:
            logits += bias.to(acc)
        rs = row_scale if row_scale.shape[0] == 1 else row_scale[r0:r0 + t]
        _launch(logits, target[r0:r0 + t], class_weight, stats[r0:r0 + t], logits if want else None, rs,
                ignore_index, transform, params, mode)
        if not want:
            continue
        if grad_mask[0]:
            gx[r0:r0 + t] = _mm_acc(logits.to(input.dtype) if input.is_cuda else logits, weight, acc)
        if grad_mask[1]:
            gw += _mm_acc(logits.t().to(input.dtype) if input.is_cuda else logits.t(), xc, acc)
        if grad_mask[2] and bias is not None:
            gb += logits.sum(0)
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


def aot_configs():
    """(kernel, signature, constexprs, num_warps) of configurations that tests/test_triton_build.py
    compiles for sm_90 without a GPU: the row kernel in each input dtype, both modes, with and
    without label smoothing."""
    out = [(_el_prob_row_kernel,
            {"X": "*bf16", "T": "*bf16", "CW": "*fp32", "STATS": "*fp32", "G": "*bf16", "RS": "*fp32", "P": "*fp32",
             "stride_x": "i64", "stride_t": "i64", "stride_g": "i64", "stride_rs": "i64", "C": "i32"},
            dict(MODE=MODE_FORWARD, HAS_LE=True, HAS_W=True, WRITE_GRAD=True, ACC=tl.float32, BLOCK=1024), 8)]
    for acc, x_dtype, mode, ls in [("fp32", "bf16", MODE_FORWARD, True), ("fp32", "fp32", MODE_BACKWARD, True),
                                   ("fp32", "fp16", MODE_FORWARD, False), ("fp64", "fp64", MODE_FORWARD, True)]:
        sig = {"X": f"*{x_dtype}", "Y": "*i64", "CW": f"*{acc}", "STATS": f"*{acc}", "G": f"*{x_dtype}",
               "RS": f"*{acc}", "P": f"*{acc}", "stride_x": "i64", "stride_g": "i64", "stride_rs": "i64",
               "C": "i32", "ignore_index": "i64"}
        consts = dict(K=int(SoftmaxTransform.ARC_FACE if ls else SoftmaxTransform.IDENTITY), MODE=mode, HAS_LE=True,
                      LS=ls, HAS_W=True, WRITE_GRAD=True, ACC=tl.float64 if acc == "fp64" else tl.float32,
                      BLOCK=1024)
        out.append((_el_row_kernel, sig, consts, 8))
    return out

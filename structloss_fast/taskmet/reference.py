"""The TaskMet family by definition (docs/spec/taskmet.md), in plain PyTorch: preconditioned
conjugate gradients, the Mahalanobis loss with the metric formed explicitly, and the implicit
gradient of an argmin through the dense Hessian. Tests compare the fast paths with these.

Conjugate gradients.

Layout: every tensor is (S, n, k): S independent systems, n unknowns, k right-hand sides per
system. Each of the S * k columns runs its own CG recurrence (its own alpha and beta, as
gpytorch's linear_cg does); the operator is applied to all k columns of a system at once.
Per-column scalars (rz, residual norm, tolerance, iterations, status) are (S, k).

A column's status is one of
    RUNNING             still iterating (at the end: maxiter reached, not converged)
    CONVERGED           ||r|| <= max(rtol ||b||, atol); b = 0 gives x = 0 at once
    NEGATIVE_CURVATURE  p^T A p <= 0 met: stopped before that step; x is the last iterate,
                        the minimiser of x^T A x / 2 - b^T x over the Krylov space explored
    BREAKDOWN           a non-finite residual (non-finite input): x is NaN
Finished columns are frozen (their x, r, p no longer change) while the others continue. The
loop itself never synchronises with the host; `check_every` iterations apart, one `any()`
asks whether every column has finished (check_every >= maxiter: no synchronisation at all).

The compiled kernels (csrc/cpu/taskmet.cpp, csrc/cuda/taskmet.cu) implement exactly these semantics.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._ids import CGStatus

RUNNING, CONVERGED, NEGATIVE_CURVATURE, BREAKDOWN = (int(CGStatus.RUNNING), int(CGStatus.CONVERGED),
                                                  int(CGStatus.NEGATIVE_CURVATURE), int(CGStatus.BREAKDOWN))

Operator = Callable[[Tensor], Tensor]


def col_dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-column inner products of (S, n, k) tensors: (S, k)."""
    return (u * v).sum(dim=-2)


def col_norm(u: Tensor) -> Tensor:
    return col_dot(u, u).sqrt()


def init_state(matvec: Operator, b: Tensor, x0: Optional[Tensor], precond: Optional[Operator], rtol: float,
               atol: float):
    """State after the set-up: (x, r, p, rz, rnorm, tol, iters, status)."""
    bnorm = col_norm(b)
    tol = torch.clamp(bnorm * rtol, min=atol)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    zero_rhs = bnorm == 0
    x = torch.where(zero_rhs.unsqueeze(-2), torch.zeros_like(x), x)
    r = torch.where(zero_rhs.unsqueeze(-2), torch.zeros_like(r), r)
    rnorm = col_norm(r)
    bad = ~torch.isfinite(rnorm)
    status = torch.full(tol.shape, RUNNING, dtype=torch.uint8, device=b.device)
    status = torch.where(rnorm <= tol, CONVERGED, status)
    status = torch.where(bad, BREAKDOWN, status).to(torch.uint8)
    x = torch.where(bad.unsqueeze(-2), torch.full_like(x, float("nan")), x)
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = col_dot(r, z)
    iters = torch.zeros(tol.shape, dtype=torch.int64, device=b.device)
    return x, r, p, rz, rnorm, tol, iters, status


def step(state, Ap: Tensor, precond: Optional[Operator]):
    """One CG iteration of every running column, given Ap = A p. Returns the new state."""
    x, r, p, rz, rnorm, tol, iters, status = state
    running = status == RUNNING
    pAp = col_dot(p, Ap)
    negative = running & (pAp <= 0)
    take = running & ~negative
    alpha = torch.where(take, rz / pAp, torch.zeros_like(pAp))
    a = alpha.unsqueeze(-2)
    t = take.unsqueeze(-2)
    x = torch.where(t, x + a * p, x)
    r = torch.where(t, r - a * Ap, r)
    rn = col_norm(r)
    rnorm = torch.where(take, rn, rnorm)
    bad = take & ~torch.isfinite(rn)
    converged = take & (rn <= tol)
    iters = iters + take.to(iters.dtype)
    status = torch.where(converged, CONVERGED, status)
    status = torch.where(negative, NEGATIVE_CURVATURE, status)
    status = torch.where(bad, BREAKDOWN, status).to(torch.uint8)
    x = torch.where(bad.unsqueeze(-2), torch.full_like(x, float("nan")), x)
    cont = status == RUNNING
    z = precond(r) if precond is not None else r
    rz_new = col_dot(r, z)
    beta = torch.where(cont, rz_new / rz, torch.zeros_like(rz))
    p = torch.where(cont.unsqueeze(-2), z + beta.unsqueeze(-2) * p, p)
    rz = torch.where(cont, rz_new, rz)
    return x, r, p, rz, rnorm, tol, iters, status


def any_running(status: Tensor) -> bool:
    """The one host synchronisation of the loop."""
    return bool((status == RUNNING).any())


def cg(matvec: Operator, b: Tensor, *, x0: Optional[Tensor] = None, precond: Optional[Operator] = None,
       rtol: float = 1e-5, atol: float = 0.0, maxiter: Optional[int] = None, check_every: int = 10):
    """CG on (S, n, k) right-hand sides. Returns (x, iterations, residual_norm, status)."""
    n = b.shape[-2]
    maxiter = 10 * n if maxiter is None else maxiter
    state = init_state(matvec, b, x0, precond, rtol, atol)
    for it in range(maxiter):
        if it % check_every == 0 and it > 0 and not any_running(state[-1]):
            break
        state = step(state, matvec(state[2]), precond)
    x, r, p, rz, rnorm, tol, iters, status = state
    return x, iters, rnorm, status


def dense_operator(A: Tensor, ridge: float = 0.0) -> Operator:
    """p -> (A + ridge I) p for A (S or 1, n, n) and p (S, n, k)."""
    if ridge == 0.0:
        return lambda p: A @ p
    return lambda p: A @ p + ridge * p


def cg_dense(A: Tensor, b: Tensor, *, x0: Optional[Tensor] = None, precond: Optional[Tensor] = None,
             ridge: float = 0.0, rtol: float = 1e-5, atol: float = 0.0, maxiter: Optional[int] = None,
             check_every: int = 10):
    """CG for dense SPD A (S or 1, n, n) and b (S, n, k). precond: None, the diagonal (S or 1, n)
    of an inverse-approximating M (z = M r), or a dense M (S or 1, n, n)."""
    M = None
    if precond is not None:
        M = (lambda r: precond.unsqueeze(-1) * r) if precond.dim() == 2 else (lambda r: precond @ r)
    return cg(dense_operator(A, ridge), b, x0=x0, precond=M, rtol=rtol, atol=atol, maxiter=maxiter,
              check_every=check_every)


# ---------------------------------------------------------------- Mahalanobis loss and implicit gradient


def metric_from_factor(metric_factor: Tensor, n: int, *, eps=0.0, diagonal: bool = False, batch: int = 1) -> Tensor:
    """Lambda = L L^T + eps I as a dense (B, n, n) tensor."""
    if diagonal:
        L = torch.diag_embed(metric_factor.expand(batch, n) if metric_factor.dim() == 1 else metric_factor)
    elif metric_factor.dim() == 2:
        L = metric_factor.unsqueeze(0).expand(batch, *metric_factor.shape)
    else:
        L = metric_factor
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    return L @ L.mT + eps * eye


def mahalanobis_loss(pred: Tensor, target: Tensor, metric_factor: Tensor, *, eps=0.0, diagonal: bool = False,
                     reduction: str = "mean") -> Tensor:
    """(pred - target)^T Lambda (pred - target) per sample, Lambda formed explicitly."""
    d = (pred - target).unsqueeze(-1)  # (B, n, 1)
    Lam = metric_from_factor(metric_factor, pred.shape[-1], eps=eps, diagonal=diagonal, batch=pred.shape[0])
    per_sample = (d.mT @ Lam @ d).reshape(pred.shape[0])
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def implicit_gradient(inner_loss: Callable, theta, params: Sequence[Tensor], grad_theta, ridge: float = 0.0):
    """dL/dparams = -(d^2 inner / dparams dtheta) (H + ridge I)^{-1} dL/dtheta, with the Hessian H
    of inner_loss(theta, *params) in theta formed densely (torch.func.hessian) and solved by
    torch.linalg.solve. theta / grad_theta: a tensor or a sequence of tensors (as implicit_argmin)."""
    single = isinstance(theta, Tensor)
    theta = [theta.detach()] if single else [t.detach() for t in theta]
    grad_theta = [grad_theta] if single else list(grad_theta)
    params = [p.detach() for p in params]
    sizes = [t.numel() for t in theta]

    def loss_flat(th_flat, *ps):
        parts = [p.view_as(t) for p, t in zip(torch.split(th_flat, sizes), theta)]
        return inner_loss(parts[0] if single else tuple(parts), *ps)

    th = flat(theta)
    H = torch.func.hessian(loss_flat, argnums=0)(th, *params)
    g = flat(grad_theta)
    v = torch.linalg.solve(H + ridge * torch.eye(th.numel(), dtype=th.dtype, device=th.device), g)
    # Mixed second derivative: d/dparams of <grad_theta inner, v>.
    ps = [p.clone().requires_grad_(True) for p in params]
    th_req = th.clone().requires_grad_(True)
    gth = torch.autograd.grad(loss_flat(th_req, *ps), th_req, create_graph=True)[0]
    out = torch.autograd.grad(gth, ps, grad_outputs=-v, allow_unused=True)
    return [torch.zeros_like(p) if o is None else o for o, p in zip(out, params)]

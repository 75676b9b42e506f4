"""Op glue of the conjugate-gradient kernels (structloss_fast::cg_dense, ::cg_update; CPU kernels
in csrc/cpu/taskmet.cpp, CUDA kernels in csrc/cuda/taskmet.cu): their backends, fake kernels for
torch.compile / opcheck, and the autograd of the dense solve.

Gradient of x = (A + ridge I)^{-1} b (A symmetric): with g = dL/dx, the adjoint solve
gb = (A + ridge I)^{-1} g gives dL/db = gb and dL/dA = -gb x^T, summed over the right-hand sides
(and over the systems that share A). The adjoint is solved by the same op with the same
tolerances; the preconditioner and x0 get no gradient (they do not change the solution).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext, _oplib, _registry

STATUS_DTYPE = torch.uint8
PRECONDITIONERS = ("none", "diag", "dense", "callable")


def _check_dense(backend: str, *, precond: str):
    if precond == "callable":
        return "the compiled kernels take no callable preconditioner"
    return None


def _check_update(backend: str, *, precond: str):
    if precond not in ("none", "diag"):
        return f"the fused update op takes no preconditioner or a diagonal one (this one is {precond})"
    return None


_registry.declare(_registry.OpSpec(
    "cg_dense", family="taskmet", kernels=("cpu", "cuda"), check_supported=_check_dense,
    limits={"cpu": "the preconditioner is a callable", "cuda": "the preconditioner is a callable"}))
_registry.declare(_registry.OpSpec(
    "cg_update", family="taskmet", kernels=("cpu", "cuda"), check_supported=_check_update,
    limits={"cpu": "the preconditioner is dense or a callable", "cuda": "the preconditioner is dense or a callable"}))


def _fake_dense(A, b, x0, precond, ridge, rtol, atol, maxiter):
    torch._check(b.dim() == 3, lambda: "cg_dense: b must be (S, n, k)")
    torch._check(A.dim() == 3 and A.shape[1] == b.shape[1] and A.shape[2] == b.shape[1],
                 lambda: "cg_dense: A must be (S, n, n)")
    S, k = b.shape[0], b.shape[2]
    return (
        torch.empty_like(b, memory_format=torch.contiguous_format),
        b.new_empty((S, k), dtype=torch.int64),
        b.new_empty((S, k)),
        b.new_empty((S, k), dtype=STATUS_DTYPE),
    )


def _fake_update(x, r, p, Ap, precond, rz, residual_norm, tol, iterations, status):
    torch._check(x.dim() == 3, lambda: "cg_update: x must be (S, n, k)")
    torch._check(r.shape == x.shape and p.shape == x.shape and Ap.shape == x.shape,
                 lambda: "cg_update: x, r, p and Ap must have one shape")
    return None


def dense_adjoint(A: Tensor, x: Tensor, grad_x: Tensor, solve, need_A: bool, need_b: bool):
    """(dL/dA, dL/db) of x = solve(A, b) for a symmetric A; solve(A, rhs) -> solution."""
    gb = solve(A, grad_x)
    gA = None
    if need_A:
        gA = -(gb @ x.mT)
        if A.shape[0] == 1 and gA.shape[0] != 1:
            gA = gA.sum(dim=0, keepdim=True)
    return gA, (gb if need_b else None)


def _setup_dense(ctx, inputs, output):
    A, b, x0, precond, ridge, rtol, atol, maxiter = inputs
    x = output[0]
    ctx.save_for_backward(A, x, precond)
    ctx.params = (float(ridge), float(rtol), float(atol), int(maxiter))
    ctx.has_precond = precond is not None
    ctx.mark_non_differentiable(*output[1:])


def _backward_dense(ctx, grad_x, _g_iters, _g_rnorm, _g_status):
    A, x, precond = ctx.saved_tensors
    ridge, rtol, atol, maxiter = ctx.params
    if grad_x is None:
        return None, None, None, None, None, None, None, None
    pre = precond if ctx.has_precond else None

    def solve(A_, rhs):
        return torch.ops.structloss_fast.cg_dense(A_, rhs.contiguous(), None, pre, ridge, rtol, atol, maxiter)[0]

    gA, gb = dense_adjoint(A, x, grad_x, solve, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return gA, gb, None, None, None, None, None, None


if _ext.extension_loaded():
    torch.library.register_fake("structloss_fast::cg_dense")(_fake_dense)
    torch.library.register_fake("structloss_fast::cg_update")(_fake_update)
    torch.library.register_autograd("structloss_fast::cg_dense", _backward_dense, setup_context=_setup_dense)
    for _op in ("cg_dense", "cg_update"):
        _oplib.register_autocast(_op)


def cg_dense(A, b, x0, precond, ridge: float, rtol: float, atol: float, maxiter: int):
    return torch.ops.structloss_fast.cg_dense(A, b, x0, precond, float(ridge), float(rtol), float(atol), int(maxiter))


def cg_update(x, r, p, Ap, precond, rz, residual_norm, tol, iterations, status) -> None:
    torch.ops.structloss_fast.cg_update(x, r, p, Ap, precond, rz, residual_norm, tol, iterations, status)

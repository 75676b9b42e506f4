"""Batched, preconditioned conjugate gradients (docs/spec/taskmet.md).

`cg(A, b)` solves (A + ridge I) x = b for symmetric positive definite A: a dense batch
(..., n, n) or a matrix-free operator (a callable p -> A p), one or several right-hand sides per
system, each column with its own recurrence, convergence test and status. It reports what
happened instead of failing silently: iterations, residual norms, a converged flag and a
negative-curvature flag per column. The loop never synchronises with the host, except one
`any()` every `check_every` iterations to stop early (matrix-free and reference paths; the
compiled dense kernels run each system's whole loop on the device and need none).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _registry, _validate
from . import _ops
from . import reference as _ref

__all__ = ["cg", "CGResult", "CGNotConverged", "CGWarning"]

CG_DTYPES = (torch.float32, torch.float64)


class CGResult(NamedTuple):
    """x has b's shape (broadcast against A's batch); the per-column fields are (...) for
    vector right-hand sides and (..., k) for b (..., n, k)."""

    x: Tensor
    iterations: Tensor          # int64: steps taken
    residual_norm: Tensor       # ||b - (A + ridge I) x|| (the recursively updated residual)
    converged: Tensor           # bool
    negative_curvature: Tensor  # bool: p^T A p <= 0 stopped this column (A not positive definite)


class CGNotConverged(RuntimeError):
    """cg(..., raise_on_fail=True) left a column unconverged."""


class CGWarning(RuntimeWarning):
    """cg(..., warn_on_fail=True) left a column unconverged."""


Operator = Callable[[Tensor], Tensor]


def _check_options(rtol, atol, ridge, maxiter, check_every):
    rtol = _validate.number("rtol", rtol, lo=0.0)
    atol = _validate.number("atol", atol, lo=0.0)
    ridge = _validate.number("ridge", ridge, lo=0.0)
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0):
        raise ValueError(f"maxiter must be None or an int >= 0, got {maxiter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    return rtol, atol, ridge


def _check_float(name, t):
    _validate.tensor(name, t)
    if t.dtype not in CG_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {_validate._desc(t)}")


# ---------------------------------------------------------------- autograd of the solves


class _DenseSolveGrad(torch.autograd.Function):
    """Implicit gradient of a dense solve computed outside the compiled op (reference path).
    Higher-order gradients are exact: with create_graph the adjoint solve is itself a
    differentiable solve of the same kind, and the solution is saved as this node's output, so
    dL/dA = -gb x^T is differentiated through x as well."""

    @staticmethod
    def forward(ctx, A, b, x, solve):
        out = x.view_as(x)
        ctx.save_for_backward(A, out)
        ctx.solve = solve
        return out

    @staticmethod
    def backward(ctx, grad_x):
        A, x = ctx.saved_tensors
        plain = ctx.solve

        def differentiable(A_, rhs):
            return _DenseSolveGrad.apply(A_, rhs, plain(A_, rhs.detach()), plain)

        # create_graph: a solve that autograd can differentiate.
        solve = differentiable if torch.is_grad_enabled() else plain
        gA, gb = _ops.dense_adjoint(A, x, grad_x, solve, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gA, gb, None, None


class _OperatorSolveGrad(torch.autograd.Function):
    """dL/db of a matrix-free solve: (A + ridge I)^{-1} dL/dx (A symmetric). Parameters captured
    by the operator get no gradient here: differentiate through an argmin with implicit_argmin.
    The adjoint is the same linear solve, so with create_graph it is applied through this
    Function again (exact higher-order gradients in b)."""

    @staticmethod
    def forward(ctx, b, x, solve):
        ctx.solve = solve
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        gb = ctx.solve(grad_x)
        if torch.is_grad_enabled():
            gb = _OperatorSolveGrad.apply(grad_x, gb, ctx.solve)
        return gb, None, None


# ---------------------------------------------------------------- drivers


def _run_operator(matvec: Operator, b3: Tensor, x03, d, apply_M, rtol, atol, maxiter, check_every, fused: bool):
    """The matrix-free loop on (S, n, k) columns: one matvec and one update per iteration, at
    most one host synchronisation every check_every iterations."""
    state = _ref.init_state(matvec, b3, x03, apply_M, rtol, atol)
    if fused:
        x, r, p, rz, rnorm, tol, iters, status = [t.contiguous() for t in state]
        for it in range(maxiter):
            if it > 0 and it % check_every == 0 and not _ref.any_running(status):
                break
            Ap = matvec(p)
            _ops.cg_update(x, r, p, Ap.contiguous(), d, rz, rnorm, tol, iters, status)
        return x, iters, rnorm, status
    for it in range(maxiter):
        if it > 0 and it % check_every == 0 and not _ref.any_running(state[-1]):
            break
        state = _ref.step(state, matvec(state[2]), apply_M)
    x, r, p, rz, rnorm, tol, iters, status = state
    return x, iters, rnorm, status


def _wrap_operator(A: Operator, b_shape, S, n, k, dtype, device) -> Operator:
    checked = []

    def matvec(p3: Tensor) -> Tensor:
        out = A(p3.reshape(b_shape))
        if not checked:  # shapes and dtypes only: no synchronisation
            if not isinstance(out, Tensor):
                raise TypeError(f"A(p) must return a tensor, got {type(out).__name__}")
            if out.shape != torch.Size(b_shape) or out.dtype != dtype or out.device != device:
                raise ValueError(
                    f"A(p) must return a tensor like p (shape {tuple(b_shape)}, dtype {dtype}, device {device}), "
                    f"got {_validate._desc(out)}"
                )
            checked.append(True)
        return out.reshape(S, n, k)

    return matvec


def _report_failures(status: Tensor, residual: Tensor, raise_on_fail: bool, warn_on_fail: bool) -> None:
    if not (raise_on_fail or warn_on_fail):
        return
    failed = status != _ref.CONVERGED
    n_failed = int(failed.sum())  # the one synchronisation that was asked for
    if n_failed == 0:
        return
    n_neg = int((status == _ref.NEGATIVE_CURVATURE).sum())
    n_bad = int((status == _ref.BREAKDOWN).sum())
    worst = residual[failed & torch.isfinite(residual)]
    msg = (f"cg: {n_failed} of {status.numel()} column(s) did not converge "
           f"({n_neg} stopped on negative curvature, {n_bad} on a non-finite residual"
           + (f", largest finite residual norm {worst.max().item():.3e}" if worst.numel() else "") + ")")
    if raise_on_fail:
        raise CGNotConverged(msg)
    warnings.warn(msg, CGWarning, stacklevel=3)


def cg(
    A: Union[Tensor, Operator],
    b: Tensor,
    *,
    x0: Optional[Tensor] = None,
    M: Union[None, str, Tensor, Operator] = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    ridge: float = 0.0,
    check_every: int = 10,
    multi_rhs: Optional[bool] = None,
    raise_on_fail: bool = False,
    warn_on_fail: bool = False,
    backend: str = "auto",
) -> CGResult:
    """Solve (A + ridge I) x = b by preconditioned conjugate gradients.

    Args:
        A: symmetric positive definite (..., n, n) float32/float64 tensor (only symmetric A is
            meaningful: the compiled kernels read A^T p), or a callable p -> A p that maps
            tensors shaped like b to tensors shaped like b (acting on each system separately).
        b: right-hand sides: (..., n) (one per system) or (..., n, k) (k per system). For a
            tensor A, b is a batch of vectors when b.ndim == A.ndim - 1 and b.shape ==
            A.shape[:-1] or b is 1-D (torch.linalg.solve's rule); otherwise (..., n, k). For a
            callable A, b is (..., n) unless multi_rhs=True.
        x0: initial guess shaped like x (default 0). A zero column of b returns x = 0 at once.
        M: preconditioner approximating (A + ridge I)^{-1}, applied as z = M r: None; "jacobi"
            (1 / diag(A + ridge), tensor A only); a tensor whose last two dims are (n, n) (dense
            M); another tensor (..., n) (the diagonal of M); or a callable r -> M r.
        rtol, atol: a column converges when ||r|| <= max(rtol ||b||, atol).
        maxiter: iterations at most (default 10 n).
        ridge: >= 0, added to A's diagonal.
        check_every: matrix-free and reference loops ask the host whether all columns have
            finished once every check_every iterations (>= maxiter: never, zero syncs).
        multi_rhs: force the (..., n, k) reading of b (see b).
        raise_on_fail / warn_on_fail: raise CGNotConverged / warn CGWarning when a column did
            not converge (one host synchronisation at the end).
        backend: "auto" | "reference" | "cpu" | "cuda". Dense A: the compiled batched kernel
            ("auto" on CPU and CUDA tensors). Matrix-free: the fused update op (cg_update) with
            no or a diagonal M; a callable or dense M runs on the reference update.

    Returns CGResult(x, iterations, residual_norm, converged, negative_curvature). A column that
    meets p^T A p <= 0 stops there with negative_curvature set and keeps its last iterate (the
    minimiser of the quadratic over the Krylov space explored so far); a non-finite residual
    gives x = NaN. Gradients: for a tensor A, x is differentiable in A and b (implicit: one
    adjoint solve); for a callable A, in b only.
    """
    rtol, atol, ridge = _check_options(rtol, atol, ridge, maxiter, check_every)
    _check_float("b", b)
    if b.dim() == 0:
        raise ValueError(f"b must have at least one dimension (n), got {_validate._desc(b)}")
    dense = isinstance(A, Tensor)
    if not dense and not callable(A):
        raise TypeError(f"A must be a tensor (..., n, n) or a callable p -> A p, got {type(A).__name__}")
    if multi_rhs is not None and not isinstance(multi_rhs, bool):
        raise TypeError(f"multi_rhs must be None or a bool, got {type(multi_rhs).__name__}")

    if dense:
        _check_float("A", A)
        if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"A must be a batch of square matrices (..., n, n), got {_validate._desc(A)}")
        if A.dtype != b.dtype:
            raise TypeError(f"A and b must have one dtype, got A {A.dtype} and b {b.dtype}")
        n = A.shape[-1]
        if multi_rhs is None:
            vec = b.dim() == 1 or (b.dim() == A.dim() - 1 and b.shape == A.shape[:-1])
        else:
            vec = not multi_rhs
    else:
        vec = not multi_rhs
        if not vec and b.dim() < 2:
            raise ValueError(f"multi_rhs=True needs b of shape (..., n, k), got {_validate._desc(b)}")
        n = b.shape[-1] if vec else b.shape[-2]
    b_n = b.shape[-1] if vec else (b.shape[-2] if b.dim() >= 2 else None)
    if b_n != n:
        raise ValueError(
            f"b must be (..., n) or (..., n, k) with n = {n} (A's size), got {_validate._desc(b)}"
            if dense else f"b has an unexpected shape {_validate._desc(b)}"
        )
    b_batch = b.shape[:-1] if vec else b.shape[:-2]
    k = 1 if vec else b.shape[-1]
    if dense:
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], b_batch)
        except RuntimeError:
            raise ValueError(f"the batch shapes of A {tuple(A.shape[:-2])} and b {tuple(b_batch)} do not broadcast "
                             f"(A {_validate._desc(A)}; b {_validate._desc(b)})") from None
    else:
        batch = b_batch
    out_shape = tuple(batch) + ((n,) if vec else (n, k))
    S = math.prod(batch)

    if x0 is not None:
        _check_float("x0", x0)
        if x0.dtype != b.dtype:
            raise TypeError(f"x0 must have b's dtype {b.dtype}, got {x0.dtype}")
        try:
            torch.broadcast_shapes(x0.shape, out_shape)
        except RuntimeError:
            raise ValueError(f"x0 must broadcast to x's shape {out_shape}, got {_validate._desc(x0)}") from None
    _validate.same_device(A=A if dense else None, b=b, x0=x0, M=M if isinstance(M, Tensor) else None)
    maxiter = 10 * n if maxiter is None else maxiter
    if S * k == 0:  # nothing to iterate on (and an operator is never called on empty input)
        maxiter = 0

    # Preconditioner: kind "none" | "diag" | "dense" | "callable".
    m_kind, m_tensor = "none", None
    if isinstance(M, str):
        if M != "jacobi":
            raise ValueError(f"M must be None, 'jacobi', a tensor or a callable, got {M!r}")
        if not dense:
            raise ValueError("M='jacobi' needs a tensor A (a callable A has no diagonal to read)")
        m_kind, m_tensor = "diag", 1.0 / (torch.diagonal(A, dim1=-2, dim2=-1) + ridge)
    elif isinstance(M, Tensor):
        _check_float("M", M)
        if M.dtype != b.dtype:
            raise TypeError(f"M must have b's dtype {b.dtype}, got {M.dtype}")
        if M.dim() >= 2 and M.shape[-2:] == (n, n):
            m_kind, m_tensor = "dense", M
        elif M.dim() >= 1 and M.shape[-1] == n:
            m_kind, m_tensor = "diag", M
        else:
            raise ValueError(f"M must be (..., n, n) (dense) or (..., n) (diagonal) with n = {n}, got {_validate._desc(M)}")
        try:
            torch.broadcast_shapes(M.shape[:-2] if m_kind == "dense" else M.shape[:-1], batch)
        except RuntimeError:
            raise ValueError(f"M's batch shape must broadcast to {tuple(batch)}, got {_validate._desc(M)}") from None
    elif M is not None:
        if not callable(M):
            raise TypeError(f"M must be None, 'jacobi', a tensor or a callable, got {type(M).__name__}")
        m_kind = "callable"

    device = b.device
    b3 = b.expand(out_shape).reshape(S, n, k)
    x03 = None if x0 is None else x0.expand(out_shape).reshape(S, n, k)

    def flat_batch(t: Tensor, tail: int) -> Tensor:
        """(..., *tail dims) -> (1 or S, *tail dims) without a copy where the batch is shared."""
        tb = t.shape[: t.dim() - tail]
        if math.prod(tb) == 1:
            return t.reshape((1,) + t.shape[t.dim() - tail:])
        return t.expand(tuple(batch) + t.shape[t.dim() - tail:]).reshape((S,) + t.shape[t.dim() - tail:])

    if m_kind == "diag":
        m3 = flat_batch(m_tensor, 1)
    elif m_kind == "dense":
        m3 = flat_batch(m_tensor, 2)
    else:
        m3 = None

    if dense:
        chosen = _registry.resolve("cg_dense", backend, device, precond=m_kind)
        A3 = flat_batch(A, 2)
        needs_grad = torch.is_grad_enabled() and (A.requires_grad or b.requires_grad)
        if chosen == "reference":
            if m_kind == "callable":
                def apply_M(r3):
                    return M(r3.reshape(out_shape)).reshape(S, n, k)
            elif m_kind == "diag":
                def apply_M(r3):
                    return m3.unsqueeze(-1) * r3
            elif m_kind == "dense":
                def apply_M(r3):
                    return m3 @ r3
            else:
                apply_M = None

            def solve_ref(A_, rhs):
                with torch.no_grad():
                    return _ref.cg(_ref.dense_operator(A_, ridge), rhs, precond=apply_M, rtol=rtol, atol=atol,
                                   maxiter=maxiter, check_every=check_every)

            with torch.no_grad():
                x3, iters, rnorm, status = _ref.cg(_ref.dense_operator(A3.detach(), ridge), b3.detach(),
                                                   x0=None if x03 is None else x03.detach(), precond=apply_M,
                                                   rtol=rtol, atol=atol, maxiter=maxiter, check_every=check_every)
            if needs_grad:
                x3 = _DenseSolveGrad.apply(A3, b3, x3, lambda A_, g: solve_ref(A_.detach(), g)[0])
        else:
            x3, iters, rnorm, status = _ops.cg_dense(
                A3, b3.contiguous(), None if x03 is None else x03.detach().contiguous(),
                None if m3 is None else m3.detach().contiguous(), ridge, rtol, atol, maxiter)
    else:
        chosen = _registry.resolve("cg_update", backend, device, precond=m_kind)
        matvec0 = _wrap_operator(A, out_shape, S, n, k, b.dtype, device)
        matvec = matvec0 if ridge == 0.0 else (lambda p: matvec0(p) + ridge * p)
        d = None
        apply_M = None
        if m_kind == "diag":
            d = m3.detach().expand(S, n).contiguous()

            def apply_M(r3):
                return d.unsqueeze(-1) * r3
        elif m_kind == "dense":
            def apply_M(r3):
                return m3 @ r3
        elif m_kind == "callable":
            def apply_M(r3):
                return M(r3.reshape(out_shape)).reshape(S, n, k)

        def solve_op(rhs3, x0_3=None):
            with torch.no_grad():
                return _run_operator(matvec, rhs3, x0_3, d, apply_M, rtol, atol, maxiter, check_every,
                                     fused=chosen != "reference")

        x3, iters, rnorm, status = solve_op(b3.detach(), None if x03 is None else x03.detach())
        if torch.is_grad_enabled() and b.requires_grad:
            x3 = _OperatorSolveGrad.apply(b3, x3, lambda g: solve_op(g.reshape(S, n, k).contiguous())[0])

    shape_cols = tuple(batch) + (() if vec else (k,))
    _report_failures(status, rnorm, raise_on_fail, warn_on_fail)
    return CGResult(
        x=x3.reshape(out_shape),
        iterations=iters.reshape(shape_cols),
        residual_norm=rnorm.reshape(shape_cols),
        converged=(status == _ref.CONVERGED).reshape(shape_cols),
        negative_curvature=(status == _ref.NEGATIVE_CURVATURE).reshape(shape_cols),
    )

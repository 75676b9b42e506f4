"""Differentiating through an inner argmin (docs/spec/taskmet.md).

- `implicit_argmin` / `custom_argmin`: the implicit function theorem; the backward solves
  (H + ridge I) v = g with conjugate gradients over Hessian-vector products (cg, matrix-free,
  no host synchronisation inside the solve), or the normal equations (the authors' torchopt
  setting), or exactly (Cholesky).
- `unrolled_argmin`: the baseline that backpropagates through gradient-descent steps.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _oplib, _validate
from .cg import cg

__all__ = ["implicit_argmin", "custom_argmin", "unrolled_argmin", "IMPLICIT_SOLVERS"]

IMPLICIT_SOLVERS = ("cg", "normal_cg", "exact")


@dataclasses.dataclass
class _ImplicitSpec:
    inner_loss: Callable
    n_theta: int
    single: bool
    solver: str
    ridge: float
    rtol: float
    atol: float
    maxiter: Optional[int]
    check_every: int
    backend: str
    info: Optional[dict]

    def pack(self, thetas):
        return thetas[0] if self.single else tuple(thetas)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _solve_hessian(spec: _ImplicitSpec, hvp: Callable[[Tensor], Tensor], rhs: Tensor) -> Tensor:
    """v = (H + ridge I)^{-1} rhs by the spec's solver; H is given by its products."""
    kw = dict(rtol=spec.rtol, atol=spec.atol, maxiter=spec.maxiter, check_every=spec.check_every, backend=spec.backend)
    if spec.solver == "cg":
        res = cg(hvp, rhs, ridge=spec.ridge, **kw)
    elif spec.solver == "normal_cg":
        # (H^T H + ridge I) v = H^T rhs, H symmetric: two products per iteration (torchopt's
        # solve_normal_cg, the authors' default).
        res = cg(lambda u: hvp(hvp(u)), hvp(rhs), ridge=spec.ridge, **kw)
    else:  # exact: H formed by N products, Cholesky (LU when H + ridge I is not positive definite)
        N = rhs.numel()
        eye = torch.eye(N, dtype=rhs.dtype, device=rhs.device)
        H = torch.stack([hvp(eye[i]) for i in range(N)], dim=1)
        H = 0.5 * (H + H.mT) + spec.ridge * eye
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:  # a synchronisation: "exact" is for tests and small problems
            v = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        else:
            v = torch.linalg.solve(H, rhs)
        res = None
        if spec.info is not None:
            spec.info["hessian"] = H.detach()
        return v
    if spec.info is not None:
        spec.info["cg"] = res
    return res.x


class _ImplicitArgmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _ImplicitSpec, *tensors):
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[: spec.n_theta])

    @staticmethod
    def backward(ctx, *grad_theta):
        # Third derivatives of the inner loss would be needed: a second derivative raises, naming
        # the function (once_differentiable's rule with a message that says which one).
        with torch.no_grad():
            grads = _ImplicitArgmin._backward(ctx, *grad_theta)
        return _oplib.no_second_derivative("implicit_argmin (custom_argmin)", *grads)

    @staticmethod
    def _backward(ctx, *grad_theta):
        spec: _ImplicitSpec = ctx.spec
        saved = ctx.saved_tensors
        thetas, params = saved[: spec.n_theta], saved[spec.n_theta:]
        need = ctx.needs_input_grad[1 + spec.n_theta:]
        none = (None,) * (1 + len(saved))
        if not any(need):
            return none
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_theta, thetas)]
        with torch.enable_grad():
            th = [t.detach().requires_grad_(True) for t in thetas]
            ps = [p.detach().requires_grad_(bool(nd)) for p, nd in zip(params, need)]
            loss = spec.inner_loss(spec.pack(th), *ps)
            g_th = torch.autograd.grad(loss, th, create_graph=True, allow_unused=True)
        connected = [i for i, g in enumerate(g_th) if g is not None and g.requires_grad]
        sizes = [t.numel() for t in th]

        def hvp(v: Tensor) -> Tensor:
            parts = list(torch.split(v, sizes))
            outs = torch.autograd.grad([g_th[i] for i in connected], th, grad_outputs=[parts[i].view_as(th[i]) for i in connected],
                                       retain_graph=True, allow_unused=True)
            return _flat([torch.zeros_like(t) if o is None else o for o, t in zip(outs, th)])

        rhs = _flat(grads).detach()
        v = _solve_hessian(spec, hvp, rhs) if connected else torch.zeros_like(rhs)
        vparts = list(torch.split(v, sizes))
        wanted = [p for p, nd in zip(ps, need) if nd]
        if connected and wanted:
            outs = torch.autograd.grad([g_th[i] for i in connected], wanted,
                                       grad_outputs=[-vparts[i].view_as(th[i]) for i in connected], allow_unused=True)
        else:
            outs = [None] * len(wanted)
        it = iter(outs)
        result = []
        for p, nd in zip(ps, need):
            if nd:
                o = next(it)
                result.append(torch.zeros_like(p) if o is None else o)
            else:
                result.append(None)
        return (None,) + (None,) * spec.n_theta + tuple(result)


def implicit_argmin(
    inner_loss: Callable,
    theta_star: Union[Tensor, Sequence[Tensor]],
    *params: Tensor,
    solver: str = "cg",
    ridge: float = 0.0,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    check_every: int = 10,
    backend: str = "auto",
    info: Optional[dict] = None,
):
    """Attach an inner solution to its parameters by the implicit function theorem.

    theta_star must be a (local) minimiser of inner_loss(theta, *params) in theta (a tensor or a
    sequence of tensors; whatever graph it carries is cut). The returned copy of theta_star
    (same structure) is differentiable in params with

        d theta* / d params = -(H + ridge I)^{-1} d^2 inner / d theta d params,

    applied in backward as one linear solve with g = dL/dtheta*: v = (H + ridge I)^{-1} g, then
    dL/dparams = -d/dparams <grad_theta inner, v>. H is never formed for solver="cg" (CG over
    Hessian-vector products by double backward: one product per iteration) or "normal_cg"
    ((H^2 + ridge I) v = H g: two products per iteration, the torchopt setting of the authors);
    "exact" forms H with N products and uses Cholesky (tests and small problems).

    rtol / atol / maxiter / check_every / backend go to structloss_fast.cg() (maxiter default
    10 N). `info`, a dict, receives the CGResult of the last backward as info["cg"] (or the
    Hessian as info["hessian"] for "exact"). Double backward is not supported.
    """
    if solver not in IMPLICIT_SOLVERS:
        raise ValueError(f"solver must be one of {IMPLICIT_SOLVERS}, got {solver!r}")
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    single = isinstance(theta_star, Tensor)
    thetas = [theta_star] if single else list(theta_star)
    if not thetas:
        raise ValueError("theta_star must be a tensor or a non-empty sequence of tensors")
    for i, t in enumerate(thetas):
        _validate.tensor(f"theta_star[{i}]" if not single else "theta_star", t, floating=True)
    for i, p in enumerate(params):
        _validate.tensor(f"params[{i}]", p, floating=True)
    ridge = _validate.number("ridge", ridge, lo=0.0)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be None or a dict, got {type(info).__name__}")
    dtypes = {t.dtype for t in thetas}
    if len(dtypes) > 1:
        raise TypeError(f"theta_star's tensors must share one dtype, got {sorted(map(str, dtypes))}")
    # cg validates the remaining options; check them now rather than in the backward.
    _validate.number("rtol", rtol, lo=0.0)
    _validate.number("atol", atol, lo=0.0)
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0):
        raise ValueError(f"maxiter must be None or an int >= 0, got {maxiter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")

    detached = [t.detach() for t in thetas]
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        out = [t.clone() for t in detached]
        return out[0] if single else tuple(out)
    spec = _ImplicitSpec(inner_loss, len(thetas), single, solver, ridge, float(rtol), float(atol), maxiter,
                         check_every, backend, info)
    out = _ImplicitArgmin.apply(spec, *detached, *params)
    return out[0] if single else tuple(out)


def custom_argmin(inner_loss: Callable, **implicit_kwargs):
    """Decorator (jaxopt/torchopt custom_root style): `solve(*params) -> theta*` becomes
    differentiable in params by implicit_argmin; the solver itself runs on detached params and
    is never differentiated through."""

    def deco(solve: Callable):
        def wrapped(*params: Tensor):
            theta = solve(*[p.detach() for p in params])
            return implicit_argmin(inner_loss, theta, *params, **implicit_kwargs)

        wrapped.__name__ = getattr(solve, "__name__", "argmin")
        wrapped.__doc__ = solve.__doc__
        return wrapped

    return deco


def unrolled_argmin(inner_loss: Callable, theta0: Union[Tensor, Sequence[Tensor]], *params: Tensor, steps: int,
                    lr: float):
    """The baseline: `steps` gradient-descent steps on inner_loss from theta0, differentiable
    through every step (create_graph): memory grows linearly with steps."""
    single = isinstance(theta0, Tensor)
    th = [theta0] if single else list(theta0)
    th = [t.detach().requires_grad_(True) for t in th]
    for _ in range(steps):
        loss = inner_loss(th[0] if single else tuple(th), *params)
        gs = torch.autograd.grad(loss, th, create_graph=True)
        th = [t - lr * g for t, g in zip(th, gs)]
    return th[0] if single else tuple(th)

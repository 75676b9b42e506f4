"""TaskMet, by definition (../shared/spec/taskmet.md): the Mahalanobis prediction loss with the
metric Lambda formed explicitly, and the implicit gradient of an argmin through the dense
Hessian. Plain autograd, dense, float64-friendly; tests compare the fast paths with these."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


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

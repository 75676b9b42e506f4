"""Adversarial training losses in plain PyTorch (docs/spec/adversarial.md), written the way the
papers' code writes them: one explicit PGD loop per attack, the TRADES attack recomputing the
clean forward pass at every step (as the authors' trades_loss does). Tests compare the package's
losses with these given the same start; the benchmarks time them as the composite peers."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, norm: str, eps, clamp) -> Tensor:
    delta = x_adv - x
    if norm == "linf":
        delta = torch.min(torch.max(delta, -eps * torch.ones_like(delta)), eps * torch.ones_like(delta))
    else:
        delta = delta * torch.clamp(eps / _norm(delta).clamp_min(1e-12), max=1.0)
    out = x + delta
    return out if clamp is None else out.clamp(*clamp)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps, n_iter: int, step_size: Optional[float] = None,
        clamp=(-1.0, 1.0), x_start: Tensor, objective=None) -> Tensor:
    """Projected gradient ascent from x_start (projected first); eps a number or (N, 1, ...)."""
    alpha = 2.5 * eps / max(n_iter, 1) if step_size is None else step_size
    objective = objective or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    was_training = model.training
    model.eval()
    x = x.detach()
    x_adv = _project(x_start.detach(), x, norm, eps, clamp)
    for _ in range(n_iter):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(model(x_adv), y), [x_adv])
        step = grad.sign() if norm == "linf" else grad / _norm(grad).clamp_min(1e-12)
        x_adv = _project(x_adv.detach() + alpha * step, x, norm, eps, clamp)
    model.train(was_training)
    return x_adv.detach()


def pgd_adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps, n_iter: int,
                         step_size: Optional[float] = None, clamp=(-1.0, 1.0), x_start: Tensor,
                         clean_weight: float = 0.0) -> Tensor:
    """Madry et al.: CE(f(x_adv), y), optionally mixed with the clean loss."""
    x_adv = pgd(model, x, y, norm=norm, eps=eps, n_iter=n_iter, step_size=step_size, clamp=clamp, x_start=x_start)
    loss = F.cross_entropy(model(x_adv), y)
    if clean_weight:
        loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(x), y)
    return loss


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, beta: float, norm: str, eps, n_iter: int,
                step_size: Optional[float] = None, clamp=(-1.0, 1.0), x_start: Tensor) -> Tensor:
    """TRADES as the authors' trades_loss computes it: the attack maximises
    KL(p(x) || p(x')) (summed, the clean forward pass recomputed at each step, evaluation mode);
    then CE(f(x), y) + beta * KL(p(x) || p(x_adv)) / N with gradients through both."""
    alpha = 2.5 * eps / max(n_iter, 1) if step_size is None else step_size
    N = x.shape[0]
    was_training = model.training
    model.eval()
    x_adv = _project(x_start.detach(), x, norm, eps, clamp)
    for _ in range(n_iter):
        x_adv.requires_grad_(True)
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad, = torch.autograd.grad(loss_kl, [x_adv])
        step = grad.sign() if norm == "linf" else grad / _norm(grad).clamp_min(1e-12)
        x_adv = _project(x_adv.detach() + alpha * step, x, norm, eps, clamp)
    model.train(was_training)
    x_adv = x_adv.detach()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="sum") / N
    return loss_natural + beta * loss_robust

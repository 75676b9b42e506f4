"""Adversarial training losses built on the package's PGD attack (structloss_fast.pgd_attack):
Madry et al.'s PGD adversarial training and TRADES (docs/spec/adversarial.md). Both take L2 or
L-inf attacks, one radius, a list of radii (attacked as one batch, the loss averaged over
them) or one radius per example; the attack loop reads nothing back to the host."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from .. import _validate
from .._train import eval_mode as _eval_mode
from .._module import LossModule
from ..jem.evaluation import pgd_attack

__all__ = ["pgd_adversarial_loss", "trades_loss", "PGDAdversarialLoss", "TRADESLoss", "TRADES_START_STD"]

TRADES_START_STD = 0.001  # the TRADES authors' start: x + 0.001 N(0, I)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean() if per_example.numel() else per_example.sum()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def _over_radii(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, int]:
    """Logits of the adversarial inputs, (E * N, C), and E (1 for a single radius)."""
    E = x_adv.shape[0] if x_adv.dim() == x.dim() + 1 else 1
    return model(x_adv.reshape(E * x.shape[0], *x.shape[1:])), E


def _check_common(model, x, y, reduction):
    _check_model(model)
    _validate.tensor("x", x, floating=True)
    _validate.tensor("y", y, ndim=1, integer=True)
    _validate.length("y", y, x.shape[0], "x")
    _validate.reduction(reduction)


def pgd_adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps, norm: str = "linf", n_iter: int = 10,
                         step_size: Optional[float] = None, random_start: bool = True, clamp=(-1.0, 1.0),
                         clean_weight: float = 0.0, reduction: str = "mean",
                         generator: Optional[torch.Generator] = None, x_init: Optional[Tensor] = None,
                         return_adversarial: bool = False):
    """PGD adversarial training loss (Madry et al.): CE(model(x_adv), y), x_adv = pgd_attack(...)
    on the current model (evaluation mode during the attack, detached afterwards), mixed with
    the clean loss by clean_weight: (1 - c) CE(adv) + c CE(clean).

    Args:
        model: the classifier (its train/eval mode is restored after the attack; the loss
            itself runs the model in the mode the caller set).
        x, y: inputs and class indices.
        eps: a radius; a list/tuple of radii (every example attacked at each; the adversarial
            term is the mean over the radii); or a (N,) tensor of per-example radii.
        norm: "linf" or "l2". n_iter, step_size (default 2.5 eps / n_iter), random_start,
            clamp (the valid input range, None: unbounded), generator, x_init: as pgd_attack.
        clean_weight: c in [0, 1]. reduction: "mean" | "sum" | "none" (per example).
        return_adversarial: also return the adversarial inputs.
    """
    _check_common(model, x, y, reduction)
    clean_weight = _validate.number("clean_weight", clean_weight, lo=0.0, hi=1.0)
    x_adv = pgd_attack(model, x, y, norm=norm, eps=eps, n_iter=n_iter, step_size=step_size,
                           random_start=random_start, clamp=clamp, generator=generator, x_init=x_init)
    logits, E = _over_radii(model, x, x_adv)
    y = y.to(x.device)
    per_example = F.cross_entropy(logits, y.repeat(E), reduction="none").view(E, -1).mean(0)
    if clean_weight > 0:
        per_example = (1 - clean_weight) * per_example + clean_weight * F.cross_entropy(model(x), y, reduction="none")
    loss = _reduce(per_example, reduction)
    return (loss, x_adv) if return_adversarial else loss


def _kl_objective(logits_adv: Tensor, clean_log_probs: Tensor) -> Tensor:
    """sum_n KL(p(x_n) || p(x'_n)) with p(x) given as log-probabilities (the attack's objective)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), clean_log_probs, reduction="sum", log_target=True)


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps, beta: float = 6.0, norm: str = "linf",
                n_iter: int = 10, step_size: Optional[float] = None, random_start=True, clamp=(-1.0, 1.0),
                reduction: str = "mean", generator: Optional[torch.Generator] = None,
                x_init: Optional[Tensor] = None, return_adversarial: bool = False):
    """TRADES (Zhang et al.): CE(model(x), y) + beta * KL(p(x) || p(x_adv)), x_adv maximising the
    KL term in the threat model (PGD on the KL with p(x) held constant, evaluation mode); the
    gradient flows through both p(x) and p(x_adv), as in the authors' code.

    Args: as pgd_adversarial_loss, plus beta >= 0 (the authors use 6 on CIFAR-10) and
    random_start: True (uniform in the ball), "gaussian" (the authors' x + 0.001 N(0, I)) or
    False (start at x, where the KL's gradient is zero up to rounding: the first step then
    follows rounding noise).
    The clean probabilities are computed once (evaluation mode, no gradient) for the attack,
    where the authors' loop recomputes them at every step.
    """
    _check_common(model, x, y, reduction)
    beta = _validate.number("beta", beta, lo=0.0)
    if random_start not in (True, False, "gaussian"):
        raise ValueError(f"random_start must be True, False or 'gaussian', got {random_start!r}")
    with _eval_mode(model), torch.no_grad():
        clean_log_probs = F.log_softmax(model(x), dim=1)
    if random_start == "gaussian" and x_init is None:
        x_init = x.detach() + TRADES_START_STD * torch.randn(x.shape, generator=generator, device=x.device,
                                                             dtype=x.dtype)
    x_adv = pgd_attack(model, x, clean_log_probs, norm=norm, eps=eps, n_iter=n_iter, step_size=step_size,
                           random_start=bool(random_start), clamp=clamp, generator=generator,
                           objective=_kl_objective, x_init=x_init)
    logits = model(x)
    logits_adv, E = _over_radii(model, x, x_adv)
    log_p = F.log_softmax(logits, dim=1)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), log_p.repeat(E, 1), reduction="none", log_target=True)
    per_example = F.cross_entropy(logits, y.to(x.device), reduction="none") + beta * kl.sum(1).view(E, -1).mean(0)
    loss = _reduce(per_example, reduction)
    return (loss, x_adv) if return_adversarial else loss


class PGDAdversarialLoss(LossModule):
    """Module form of pgd_adversarial_loss: forward(model, x, y)."""

    _function = pgd_adversarial_loss
    _options = ("eps", "norm", "n_iter", "step_size", "random_start", "clamp", "clean_weight", "reduction",
                "generator")

    def __init__(self, *, eps, norm: str = "linf", n_iter: int = 10, step_size: Optional[float] = None,
                 random_start: bool = True, clamp=(-1.0, 1.0), clean_weight: float = 0.0, reduction: str = "mean",
                 generator: Optional[torch.Generator] = None):
        _validate.reduction(reduction)
        super().__init__(eps=eps, norm=norm, n_iter=n_iter, step_size=step_size, random_start=random_start,
                         clamp=clamp, clean_weight=_validate.number("clean_weight", clean_weight, lo=0.0, hi=1.0),
                         reduction=reduction, generator=generator)


class TRADESLoss(LossModule):
    """Module form of trades_loss: forward(model, x, y)."""

    _function = trades_loss
    _options = ("eps", "beta", "norm", "n_iter", "step_size", "random_start", "clamp", "reduction", "generator")

    def __init__(self, *, eps, beta: float = 6.0, norm: str = "linf", n_iter: int = 10,
                 step_size: Optional[float] = None, random_start=True, clamp=(-1.0, 1.0), reduction: str = "mean",
                 generator: Optional[torch.Generator] = None):
        _validate.reduction(reduction)
        super().__init__(eps=eps, beta=_validate.number("beta", beta, lo=0.0), norm=norm, n_iter=n_iter,
                         step_size=step_size, random_start=random_start, clamp=clamp, reduction=reduction,
                         generator=generator)

"""TaskMet's learned metric (Bansal, Chen, Mukadam, Amos, NeurIPS 2023; docs/spec/taskmet.md):
the Mahalanobis prediction loss (f - y)^T Lambda (f - y) with Lambda = L L^T + eps I never
formed, the authors' per-sample metric network `MetricNet` and the cheap `DiagonalMetricNet`."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _validate

__all__ = ["mahalanobis_loss", "MetricNet", "DiagonalMetricNet"]


def mahalanobis_loss(
    pred: Tensor,
    target: Tensor,
    metric_factor: Tensor,
    *,
    eps: Union[float, Tensor] = 0.0,
    diagonal: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Mahalanobis prediction loss (pred - target)^T Lambda (pred - target) per sample, with
    Lambda = L L^T + eps I, computed as ||L^T (pred - target)||^2 + eps ||pred - target||^2:
    Lambda is never formed (memory B x r for the factor products, not B x n x n).

    Args:
        pred, target: (B, n) float tensors of one shape.
        metric_factor: the factor L: (B, n, r) per sample, (n, r) shared by all samples, or with
            diagonal=True the diagonal of L, (B, n) per sample or (n,) shared (Lambda = diag(L^2)).
        eps: >= 0, a float or a 0-dim tensor (e.g. the authors' learned identity weight).
        reduction: "mean" (over samples) | "sum" | "none" ((B,)).
    """
    _validate.tensor("pred", pred, ndim=2, floating=True)
    _validate.tensor("target", target, floating=True)
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {_validate._desc(target)}")
    _validate.tensor("metric_factor", metric_factor, floating=True)
    _validate.reduction(reduction)
    B, n = pred.shape
    if diagonal:
        if not (metric_factor.shape == (B, n) or metric_factor.shape == (n,)):
            raise ValueError(f"with diagonal=True, metric_factor must be (B, n) = {(B, n)} or (n,) = ({n},), "
                             f"got {_validate._desc(metric_factor)}")
    elif metric_factor.dim() == 3:
        if metric_factor.shape[:2] != (B, n):
            raise ValueError(f"a per-sample metric_factor must be (B, n, r) with (B, n) = {(B, n)}, "
                             f"got {_validate._desc(metric_factor)}")
    elif metric_factor.dim() == 2:
        if metric_factor.shape[0] != n:
            raise ValueError(f"a shared metric_factor must be (n, r) with n = {n}, got {_validate._desc(metric_factor)}")
    else:
        raise ValueError(f"metric_factor must be (B, n, r), (n, r), or with diagonal=True (B, n) / (n,), "
                         f"got {_validate._desc(metric_factor)}")
    if isinstance(eps, Tensor):
        if eps.dim() != 0:
            raise ValueError(f"eps must be a number or a 0-dim tensor, got {_validate._desc(eps)}")
    else:
        eps = _validate.number("eps", eps, lo=0.0)
    _validate.same_device(pred=pred, target=target, metric_factor=metric_factor,
                          eps=eps if isinstance(eps, Tensor) else None)

    # Under autocast: float32, as F.mse_loss (the products would be autocast to 16 bits).
    pred, target, metric_factor = _oplib.loss_inputs(pred, target, metric_factor)
    with _oplib.autocast_off(pred.device):
        d = pred - target
        if diagonal:
            per_sample = (metric_factor * d).square().sum(dim=-1)
        elif metric_factor.dim() == 3:
            per_sample = torch.einsum("bn,bnr->br", d, metric_factor).square().sum(dim=-1)
        else:
            per_sample = (d @ metric_factor).square().sum(dim=-1)
        if isinstance(eps, Tensor) or eps != 0.0:
            per_sample = per_sample + eps * d.square().sum(dim=-1)
        if reduction == "mean":
            return per_sample.mean()
        if reduction == "sum":
            return per_sample.sum()
        return per_sample


class MetricNet(nn.Module):
    """The authors' metric network: Linear(in_features, hidden) -> ReLU -> Linear(hidden, n * n),
    reshaped to a per-sample factor L (B, n, n); Lambda(x) = L L^T + exp(log_identity) I with a
    learned identity weight (initialised to 1). identity_init starts L near I (last layer's
    weights divided by identity_init_scale, bias = I), as in the authors' option."""

    def __init__(self, in_features: int, n: int, hidden: int = 200, *, identity_init: bool = False,
                 identity_init_scale: float = 100.0, learn_identity: bool = True):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n * n))
        if identity_init:
            with torch.no_grad():
                self.net[-1].weight.div_(identity_init_scale)
                self.net[-1].bias.copy_(torch.eye(n).reshape(-1))
        self.log_identity = nn.Parameter(torch.zeros(()), requires_grad=learn_identity)

    def forward(self, x: Tensor) -> Tensor:
        """The factor L (B, n, n) for features x (B, in_features)."""
        return self.net(x).view(x.shape[0], self.n, self.n)

    def identity_weight(self) -> Tensor:
        return self.log_identity.exp()

    def loss(self, x: Tensor, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return mahalanobis_loss(pred, target, self(x), eps=self.identity_weight(), reduction=reduction)

    def metric(self, x: Tensor) -> Tensor:
        """Lambda(x) (B, n, n), formed explicitly (for plots and tests)."""
        L = self(x)
        return L @ L.mT + self.identity_weight() * torch.eye(self.n, dtype=L.dtype, device=L.device)


class DiagonalMetricNet(nn.Module):
    """Diagonal metric: Linear -> ReLU -> Linear(hidden, n) -> softplus gives the diagonal l of
    the factor, Lambda(x) = diag(l^2) + eps I (eps fixed, default 0)."""

    def __init__(self, in_features: int, n: int, hidden: int = 200, *, eps: float = 0.0):
        super().__init__()
        self.n = n
        self.eps = _validate.number("eps", eps, lo=0.0)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.net(x))

    def identity_weight(self) -> float:
        return self.eps

    def loss(self, x: Tensor, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return mahalanobis_loss(pred, target, self(x), eps=self.eps, diagonal=True, reduction=reduction)

    def metric(self, x: Tensor) -> Tensor:
        return torch.diag_embed(self(x).square()) + self.eps * torch.eye(self.n, dtype=x.dtype, device=x.device)

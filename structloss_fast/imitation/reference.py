"""The layer-imitation loss in plain PyTorch (docs/spec/imitation.md): the definition that the
compiled kernel, the tests and the benchmarks are compared with. Works in any dtype and on any
device; float64 in, float64 out."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "batchmean")


def divisor(t: Tensor, reduction: str) -> int:
    """D_i of the spec: what a layer's sum of squared errors is divided by (at least 1)."""
    if reduction == "mean":
        return max(t.numel(), 1)
    if reduction == "batchmean":
        return max(t.shape[0], 1) if t.dim() > 0 else 1
    return 1


def layer_imitation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], weights: Sequence[float],
                         reductions: Sequence[str], per_layer: bool = False) -> Tensor:
    """sum_i w_i * R_i((s_i - t_i)^2); with per_layer, the vector of the terms."""
    terms = [w * ((s - t) ** 2).sum() / divisor(s, r) for s, t, w, r in zip(student, teacher, weights, reductions)]
    stacked = torch.stack(terms)
    return stacked if per_layer else stacked.sum()

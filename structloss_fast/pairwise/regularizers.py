"""Embedding regularizers (`embedding_regularizer=` of the pairwise losses), as
pytorch-metric-learning's: the loss adds `embedding_reg_weight * regularizer(embeddings)`.
Any callable taking the (B, D) embeddings to a scalar is accepted, PML's regularizer objects
among them."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .reducers import Elements, MeanReducer, as_reducer

__all__ = ["LpRegularizer"]


class LpRegularizer(nn.Module):
    """The reducer's (MeanReducer by default) reduction of the rows' ||x||_p ** power."""

    def __init__(self, p: float = 2, power: float = 1, reducer=None):
        super().__init__()
        for name, v in (("p", p), ("power", power)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        self.p, self.power = p, power
        self.reducer = as_reducer(reducer) if reducer is not None else MeanReducer()

    def forward(self, x: Tensor) -> Tensor:
        reg = torch.linalg.vector_norm(x, ord=self.p, dim=1)
        if self.power != 1:
            reg = reg ** self.power
        idx = torch.arange(x.shape[0], device=x.device)
        return self.reducer.reduce_elements(Elements(reg, idx, "element"), x, idx)

    def extra_repr(self):
        return f"p={self.p}, power={self.power}"


def check(regularizer, weight):
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"embedding_regularizer must be callable (e.g. LpRegularizer()), got {type(regularizer).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"embedding_reg_weight must be a number, got {type(weight).__name__}")

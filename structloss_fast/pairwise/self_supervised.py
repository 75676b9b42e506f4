"""Two augmented views of a batch without labels, as pytorch-metric-learning's SelfSupervisedLoss:
row i of one view and row i of the other are the only positive pair of each other."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate

__all__ = ["SelfSupervisedLoss"]


class SelfSupervisedLoss(nn.Module):
    """loss_fn = SelfSupervisedLoss(NTXentLoss()); loss = loss_fn(view1, view2).

    symmetric=True: the loss of the 2B rows [view1; view2] with labels [0..B-1, 0..B-1] (each
    view's row against every other row); symmetric=False: view1's rows as anchors against view2's
    rows as references."""

    def __init__(self, loss, symmetric: bool = True):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a pairwise loss module, got {type(loss).__name__}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.loss, self.symmetric = loss, symmetric

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
        _validate.tensor("ref_emb", ref_emb, ndim=2, floating=True)
        if ref_emb.shape != embeddings.shape:
            raise ValueError(f"ref_emb (the other view) must have the shape of embeddings {tuple(embeddings.shape)}, "
                             f"got {tuple(ref_emb.shape)}")
        _validate.same_device(embeddings=embeddings, ref_emb=ref_emb)
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())

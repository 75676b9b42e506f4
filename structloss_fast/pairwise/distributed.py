"""Pairwise losses across processes (torch.distributed): each rank's anchors are its local rows,
the references are the all-gathered global batch, and gradients reach the rows of every rank.

Contract: on every rank the loss equals the single-process loss on the concatenated batch, and
after DistributedDataParallel averages the parameter gradients they equal the single-process
gradients. Works with any backend that has all_gather and all_reduce (gloo, NCCL).

How: the global loss is sum_k (sum over all anchors of term k) / count_k (see
structloss_fast/pairwise/reference.py). Each rank computes its anchors' terms against the
gathered references, and the counts (and SupCon/NT-Xent's batch gate) are all-reduced. A rank
back-propagates world_size times its own share of the loss; the gather's backward sums what every
rank sends back to each slice (an all-reduce), so each rank's embeddings receive world_size times
the full gradient of the global loss, which DDP's averaging divides back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _validate
from . import _ops
from .losses import PairwiseLoss, loss_terms

__all__ = ["DistributedPairwiseLoss", "all_gather_with_grad"]


def _gather_sizes(n: int, device, group) -> list[int]:
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return [int(s.item()) for s in sizes]  # the only host sync: shapes must be known to gather


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of rows (ranks may hold different numbers) whose backward returns to each rank
    the sum, over all ranks, of the gradient of its slice."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        rank = dist.get_rank(group)
        rows = max(sizes)
        padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.offset = sum(sizes[:rank])
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        n = ctx.sizes[dist.get_rank(ctx.group)]
        return grad[ctx.offset: ctx.offset + n], None, None


def all_gather_with_grad(x: Tensor, group=None) -> tuple[Tensor, int]:
    """(the concatenation of every rank's x along dim 0, this rank's row offset in it)."""
    sizes = _gather_sizes(x.shape[0], x.device, group)
    out = _GatherWithGrad.apply(x, sizes, group)
    return out, sum(sizes[: dist.get_rank(group)])


def _all_gather_nograd(x: Tensor, sizes, group) -> Tensor:
    rows = max(sizes)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class DistributedPairwiseLoss(nn.Module):
    """Wraps a structloss_fast pairwise loss module (CircleLoss, SupConLoss, NTXentLoss, ...) for
    multi-process training: call it on each rank's local embeddings and labels.

        loss_fn = DistributedPairwiseLoss(structloss_fast.SupConLoss())
        loss = loss_fn(model(x_local), y_local)   # same value on every rank
        loss.backward()                            # under DDP, gradients = single-process ones

    reduction "none" returns this rank's anchors' losses against the global batch.
    Without an initialized process group it computes the plain single-process loss.
    """

    def __init__(self, loss: PairwiseLoss, group=None):
        super().__init__()
        if not isinstance(loss, PairwiseLoss):
            raise TypeError(f"loss must be a structloss_fast pairwise loss module, got {type(loss).__name__}")
        self.loss = loss
        self.group = group

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return self.loss(embeddings, labels)
        _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
        _validate.tensor("labels", labels, ndim=1, integer=True)
        _validate.length("labels", labels, embeddings.shape[0], "embeddings")
        name, params = self.loss.spec()
        loss_id = _ops.LOSSES[name]
        world = dist.get_world_size(self.group)
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, self.group)
        ref = _GatherWithGrad.apply(embeddings, sizes, self.group)
        ref_labels = _all_gather_nograd(labels.to(torch.int64), sizes, self.group)
        offset = sum(sizes[: dist.get_rank(self.group)])
        terms, stats = loss_terms(name, params, embeddings, labels, ref, ref_labels,
                                  ref_self_index=offset if ref.shape[0] else None, backend=self.loss.backend)
        # Global reducer counts and the gate's pair counts, then this rank's share of the loss.
        batch_totals = _ops.totals(stats, loss_id)
        dist.all_reduce(batch_totals, group=self.group)
        local = _ops.reduce_terms(terms, batch_totals, loss_id, self.loss.reduction)
        if self.loss.reduction == "none":
            return local
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return local * world + (total - local.detach() * world)

    def extra_repr(self):
        return f"loss={type(self.loss).__name__}"

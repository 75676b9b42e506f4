"""CrossBatchMemory against pytorch-metric-learning's over several steps (wrap-around
included), for every pairwise loss."""
from __future__ import annotations

import pytest
import torch

import structloss_fast as slf
from tests.helpers import LazyImport

pml_losses = LazyImport("pytorch_metric_learning.losses")

PAIRS = [
    ("circle", lambda: slf.CircleLoss(), lambda: pml_losses.CircleLoss()),
    ("multi_similarity", lambda: slf.MultiSimilarityLoss(), lambda: pml_losses.MultiSimilarityLoss()),
    ("supcon", lambda: slf.SupConLoss(), lambda: pml_losses.SupConLoss()),
    ("ntxent", lambda: slf.NTXentLoss(), lambda: pml_losses.NTXentLoss()),
    ("contrastive", lambda: slf.ContrastiveLoss(), lambda: pml_losses.ContrastiveLoss()),
    ("triplet", lambda: slf.TripletMarginLoss(margin=0.2), lambda: pml_losses.TripletMarginLoss(margin=0.2)),
]


@pytest.mark.parametrize("name,ours,theirs", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matches_pml_over_steps(name, ours, theirs, backend):
    D, memory = 8, 40
    gen = torch.Generator().manual_seed(0)
    mine = slf.CrossBatchMemory(ours(), D, memory_size=memory)
    mine.loss.backend = backend
    pml = pml_losses.CrossBatchMemory(theirs(), D, memory_size=memory)
    for step, B in enumerate([12, 12, 16, 9, 12, 16, 7]):  # wraps around the 40-slot memory twice
        x = torch.randn(B, D, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 5, (B,), generator=gen)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        l1 = mine(x1, y)
        l2 = pml(x2, y)
        g1, = torch.autograd.grad(l1, x1, allow_unused=True)
        g2, = torch.autograd.grad(l2, x2, allow_unused=True)
        g1 = torch.zeros_like(x) if g1 is None else g1
        g2 = torch.zeros_like(x) if g2 is None else g2
        assert abs(l1.item() - l2.item()) <= 1e-10 * max(1.0, abs(l2.item())), (step, l1.item(), l2.item())
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12), step
        assert mine.queue_idx == pml.queue_idx and mine.has_been_filled == pml.has_been_filled
        assert torch.equal(mine.embedding_memory, pml.embedding_memory.to(mine.embedding_memory.dtype))
        assert torch.equal(mine.label_memory, pml.label_memory)


def test_enqueue_mask_matches_pml():
    D = 6
    gen = torch.Generator().manual_seed(1)
    mine = slf.CrossBatchMemory(slf.ContrastiveLoss(), D, memory_size=32)
    pml = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D, memory_size=32)
    for _ in range(4):
        x = torch.randn(14, D, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 4, (14,), generator=gen)
        mask = torch.rand(14, generator=gen) < 0.5
        l1 = mine(x, y, enqueue_mask=mask)
        l2 = pml(x, y, enqueue_mask=mask)
        assert abs(l1.item() - l2.item()) <= 1e-10 * max(1.0, abs(l2.item()))


def test_memory_gets_no_gradient_and_is_detached():
    xbm = slf.CrossBatchMemory(slf.CircleLoss(), 4, memory_size=16)
    x = torch.randn(8, 4, requires_grad=True)
    y = torch.arange(8) % 3
    xbm(x, y).backward()
    assert not xbm.embedding_memory.requires_grad
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_input():
    with pytest.raises(TypeError, match="loss must be a pairwise loss module"):
        slf.CrossBatchMemory(42, 4)
    with pytest.raises(TypeError, match="miner must be a miner"):
        slf.CrossBatchMemory(slf.CircleLoss(), 4, miner="hard")
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        slf.CrossBatchMemory(slf.CircleLoss(), 4, memory_size=0)
    xbm = slf.CrossBatchMemory(slf.CircleLoss(), 4, memory_size=8)
    with pytest.raises(ValueError, match="does not fit in memory_size=8"):
        xbm(torch.randn(9, 4), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding_size=4"):
        xbm(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="enqueue_mask must be a bool"):
        xbm(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), enqueue_mask=torch.ones(3))

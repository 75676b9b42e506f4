"""Zero embeddings on the Triton kernels: F.normalize maps a zero row to the zero vector, whose
distance to a unit row is 1 (d^2 = |x|^2 + |r|^2 - 2 x.r with |x| = 0), not sqrt(2) (the
unit-row shortcut 2 - 2 s). pytorch-metric-learning (LpDistance on normalized embeddings, i.e.
cdist) is the definition here."""
from __future__ import annotations

import pytest
import torch

import structloss_fast as slf
from tests.helpers import LazyImport, assert_tight, can_run, triton_device

pml_losses = LazyImport("pytorch_metric_learning.losses")
pml_miners = LazyImport("pytorch_metric_learning.miners")

pytestmark = pytest.mark.skipif(not can_run("triton", "pairwise_loss"), reason="triton unavailable")


def _batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 20, dtype=torch.float64, generator=g)
    x[0] = 0
    x[7] = 0
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2])
    return x, y


def _pml_batch_hard(x, y):
    return pml_losses.TripletMarginLoss(margin=0.05)(x, y, pml_miners.BatchHardMiner()(x, y))


# (Not the default neg_margin = 1: a zero row's pairs sit exactly on it, where one ulp of d
# decides whether AvgNonZeroReducer counts the pair.)
CASES = {
    "contrastive_margins": (lambda x, y, b: slf.contrastive_loss(x, y, pos_margin=0.3, neg_margin=1.2, backend=b),
                            lambda x, y: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2)(x, y)),
    "triplet_hard": (lambda x, y, b: slf.triplet_margin_loss(x, y, margin=0.05, mining="batch_hard", backend=b),
                     _pml_batch_hard),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_rows_match_pml(case):
    ours, theirs = CASES[case]
    x, y = _batch()
    xd = x.to(triton_device()).requires_grad_(True)
    out = ours(xd, y.to(triton_device()), "triton")
    g, = torch.autograd.grad(out, xd)
    xp = x.clone().requires_grad_(True)
    expected = theirs(xp, y)
    gp, = torch.autograd.grad(expected, xp)
    assert_tight(out, expected, rtol=1e-10, what="loss")
    # the zero rows' gradients pass F.normalize's 1 / eps: compare relative to their size
    assert_tight(g, gp, rtol=1e-9, what="gradient")


def test_zero_row_distance_is_one():
    """The loss of one zero anchor against unit references: each pair at distance exactly 1."""
    x = torch.zeros(1, 8, dtype=torch.float64)
    r = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    # contrastive with neg_margin 1.5: each negative contributes 1.5 - d = 0.5
    out = slf.contrastive_loss(x.to(triton_device()), torch.tensor([0], device=triton_device()),
                               ref_embeddings=r.to(triton_device()), ref_labels=torch.ones(5, dtype=torch.long,
                                                                                         device=triton_device()),
                               neg_margin=1.5, backend="triton")
    assert_tight(out, torch.tensor(0.5, dtype=torch.float64), rtol=1e-12)

"""Degenerate and non-finite inputs of the pairwise losses, on every backend: zero embedding rows
(distances of the normalized vectors themselves, as pytorch-metric-learning's LpDistance), NaN
and Inf embeddings whatever the labels (NaN wherever PML gives NaN, and also where its
non-zero filter drops the NaN), what the reference accepts (mixed dtypes), and loss parameters
given as numpy scalars or 0-d tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import structloss_fast as slf
from structloss_fast.pairwise import reference as ref
from tests.helpers import fast_backends

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

BACKENDS = [("reference", torch.device("cpu"))] + fast_backends("pairwise_loss")

# (function, keyword arguments, PML's loss (and miner) with the same semantics)
LOSSES = {
    "circle": (slf.circle_loss, dict(), lambda: pml_losses.CircleLoss()),
    "unified": (slf.unified_loss, dict(), None),
    "multi_similarity": (slf.multi_similarity_loss, dict(), lambda: pml_losses.MultiSimilarityLoss()),
    "supcon": (slf.supcon_loss, dict(), lambda: pml_losses.SupConLoss()),
    "ntxent": (slf.ntxent_loss, dict(), lambda: pml_losses.NTXentLoss()),
    "contrastive": (slf.contrastive_loss, dict(), lambda: pml_losses.ContrastiveLoss()),
    "triplet_all": (slf.triplet_margin_loss, dict(mining="all"), lambda: pml_losses.TripletMarginLoss()),
    "triplet_hard": (slf.triplet_margin_loss, dict(mining="batch_hard"), "hard"),
}


def runs(backend, name):
    return not (backend == "triton" and name == "triplet_all")


def pml_value(name, x, y):
    make = LOSSES[name][2]
    if make is None:
        return None
    if make == "hard":
        loss, miner = pml_losses.TripletMarginLoss(), pml_miners.BatchHardMiner()
        return loss(x, y, miner(x, y)).item()
    return make()(x, y).item()


# ---------------------------------------------------------------- zero rows

ZERO_ROWS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
ZERO_LABELS = torch.tensor([0, 0, 1])
# The values: PML's (and the definition's) d(0, r^) = ||0 - r^|| = 1.
ZERO_CASES = [("contrastive", dict(neg_margin=2.0)), ("triplet_all", dict(margin=0.5)),
              ("triplet_hard", dict(margin=0.5))]


def _zero_case_params():
    out = []
    for b, d in BACKENDS:
        for name, kw in ZERO_CASES:
            if not runs(b, name):
                continue
            out.append(pytest.param(b, d, name, kw, id=f"{b}-{name}"))
    return out


@pytest.mark.parametrize("backend,device,name,kw", _zero_case_params())
def test_zero_embedding_row_distance_is_one(backend, device, name, kw):
    """x = [[0,0],[1,0],[0,1]], labels [0,0,1]: contrastive_loss(neg_margin=2) is 1.79289 and
    triplet_margin_loss(margin=0.5) 0.29289 in PML, as by definition (d = ||x^ - r^||)."""
    fn, base, _ = LOSSES[name]
    loss_kw = {**base, **kw}
    if name == "contrastive":
        expected = pml_losses.ContrastiveLoss(**kw)(ZERO_ROWS, ZERO_LABELS).item()
    elif name == "triplet_all":
        expected = pml_losses.TripletMarginLoss(**kw)(ZERO_ROWS, ZERO_LABELS).item()
    else:
        miner = pml_miners.BatchHardMiner()
        expected = pml_losses.TripletMarginLoss(**kw)(ZERO_ROWS, ZERO_LABELS, miner(ZERO_ROWS, ZERO_LABELS)).item()
    assert expected == pytest.approx({"contrastive": 1.7928932188, "triplet_all": 0.2928932188,
                                      "triplet_hard": 0.2928932188}[name])
    out = fn(ZERO_ROWS.to(device), ZERO_LABELS.to(device), backend=backend, **loss_kw)
    assert out.item() == pytest.approx(expected, rel=1e-9)


def test_reference_distance_of_normalized_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    r = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    x[1] = 0
    r[2] = 0
    xh, rh = ref.normalize(x), ref.normalize(r)
    d = ref.euclidean_distance(xh, rh, xh @ rh.T)
    torch.testing.assert_close(d, torch.cdist(xh, rh))
    assert d[1, 2] == 0 and torch.allclose(d[1, [0, 1, 3]], torch.ones(3, dtype=torch.float64))
    s = xh @ rh.T
    s[0, 0] = float("nan")
    assert torch.isnan(ref.euclidean_distance(xh, rh, s)[0, 0])  # a NaN distance stays NaN


# ---------------------------------------------------------------- non-finite embeddings

PATTERNS = {"one_class": torch.zeros(6, dtype=torch.long), "all_distinct": torch.arange(6),
            "mixed": torch.tensor([0, 0, 1, 1, 2, 2])}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d.type}" for b, d in BACKENDS])
def test_non_finite_embedding_gives_nan_whatever_the_labels(backend, device, name, pattern, value):
    if not runs(backend, name):
        pytest.skip("Triton has no all-triplets kernel")
    fn, kw, _ = LOSSES[name]
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[0, 0] = value
    y = PATTERNS[pattern]
    for reduction in ("mean", "sum", "none"):
        out = fn(x.to(device), y.to(device), backend=backend, reduction=reduction, **kw)
        assert torch.isnan(out).all(), f"{name} {pattern} {reduction}: {out}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d.type}" for b, d in BACKENDS])
def test_non_finite_reference_embeddings_give_nan(backend, device):
    x = torch.randn(4, 3, dtype=torch.float64)
    r = torch.randn(5, 3, dtype=torch.float64)
    r[3, 1] = float("nan")
    out = slf.supcon_loss(x.to(device), torch.arange(4).to(device), ref_embeddings=r.to(device),
                          ref_labels=torch.arange(10, 15).to(device), backend=backend)
    assert torch.isnan(out)


def test_pml_gives_nan_where_the_labels_leave_no_pair():
    """The issue's cases, where the terms alone would be 0: PML's NaN (and ours)."""
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[0, 0] = float("nan")
    for name in ("circle", "supcon", "ntxent", "triplet_hard"):
        for pattern in ("one_class", "all_distinct"):
            assert np.isnan(pml_value(name, x, PATTERNS[pattern])), (name, pattern)
            assert torch.isnan(LOSSES[name][0](x, PATTERNS[pattern], **LOSSES[name][1]))


# ---------------------------------------------------------------- what the reference accepts


@pytest.mark.parametrize("name", ["circle", "contrastive", "triplet_all"])
def test_reference_takes_mixed_embedding_and_reference_dtypes(name):
    fn, kw, _ = LOSSES[name]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=gen)
    r = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y, ry = torch.tensor([0, 1, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2])
    out = fn(x, y, ref_embeddings=r, ref_labels=ry, backend="reference", **kw)
    exp = fn(x.double(), y, ref_embeddings=r, ref_labels=ry, backend="reference", **kw)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, exp.float())
    fast = fn(x, y, ref_embeddings=r, ref_labels=ry, backend="cpu", **kw)
    torch.testing.assert_close(fast, out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parameters as PML takes them


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_numpy_and_tensor_parameters(backend):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    exp = slf.circle_loss(x, y, m=0.3, gamma=32.0, backend=backend)
    for m, gamma in [(np.float32(0.3), np.float64(32.0)), (torch.tensor(0.3), torch.tensor(32)),
                     (np.float64(0.3), np.int64(32))]:
        torch.testing.assert_close(slf.circle_loss(x, y, m=m, gamma=gamma, backend=backend), exp)
    torch.testing.assert_close(slf.CircleLoss(m=torch.tensor(0.3), gamma=np.float32(32.0), backend=backend)(x, y), exp)
    t = slf.supcon_loss(x, y, temperature=np.float32(0.2), backend=backend)
    torch.testing.assert_close(t, slf.supcon_loss(x, y, temperature=0.2, backend=backend))
    with pytest.raises(TypeError, match="gamma is a constant of the loss"):
        slf.circle_loss(x, y, gamma=torch.tensor(32.0, requires_grad=True), backend=backend)
    with pytest.raises(TypeError, match="m must be a number or a 0-d real tensor"):
        slf.circle_loss(x, y, m=torch.tensor([0.3]), backend=backend)
    with pytest.raises(TypeError, match="m must be a number"):
        slf.circle_loss(x, y, m=True, backend=backend)
    with pytest.raises(ValueError, match="gamma must be finite"):
        slf.circle_loss(x, y, gamma=np.float64("inf"), backend=backend)


# The losses ported from PML read distances too: a zero row is at distance 1 on every backend
# (the CPU epilogues and the ATen epilogue of the CUDA strip engine, forced here on CPU). beta is
# exact in float32 (PML keeps it as a float32 tensor).
ZERO_PORTED = {
    "generalized_lifted_structure": (slf.generalized_lifted_structure_loss,
                                     lambda: pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.5)),
    "margin": (slf.margin_based_loss, lambda: pml_losses.MarginLoss(margin=0.5, beta=1.25)),
    "fastap": (slf.fastap_loss, lambda: pml_losses.FastAPLoss(num_bins=4)),
}
ZERO_PORTED_KW = {"generalized_lifted_structure": dict(neg_margin=1.5), "margin": dict(margin=0.5, beta=1.25),
                  "fastap": dict(num_bins=4)}


@pytest.mark.parametrize("epilogue", ["reference", "cpu", "aten"])
@pytest.mark.parametrize("name", list(ZERO_PORTED))
def test_ported_losses_zero_row_distance_is_one(monkeypatch, name, epilogue):
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 0.0],
                      [0.3, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    fn, pml = ZERO_PORTED[name]
    xp = x.clone().requires_grad_(True)
    expected = pml()(xp, y)
    expected.backward()
    if epilogue == "aten":
        monkeypatch.setenv("STRUCTLOSS_FAST_PAIRWISE_EPILOGUE", "aten")
    xo = x.clone().requires_grad_(True)
    out = fn(xo, y, backend="reference" if epilogue == "reference" else "cpu", **ZERO_PORTED_KW[name])
    out.backward()
    assert out.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(xo.grad, xp.grad, rtol=1e-7, atol=1e-9)

"""The symmetric-block engine of the CPU driver (Circle, unified, multi-similarity, SupCon,
contrastive without references): every strip used for both anchor sides. Against the reference
in float64 over strip sizes (many strips, so that the later anchors' side is exercised), both
gradient accumulations, every reduction, label patterns; against the strip engine; deterministic."""
from __future__ import annotations

import pytest
import torch
import structloss_fast as slf
from tests.helpers import assert_tight
from tests.pairwise.test_losses import LOSS_BY_NAME, labels_pattern, run, run_reference

SYMMETRIC = ["circle", "unified", "multi_similarity", "supcon", "contrastive"]
ENV = "STRUCTLOSS_FAST_PAIRWISE_SYMMETRIC"
STRIP_ENV = "STRUCTLOSS_FAST_PAIRWISE_STRIP_ROWS"
SPARSE_ENV = "STRUCTLOSS_FAST_PAIRWISE_SPARSE"


@pytest.mark.parametrize("sparse", ["0", "1"])
@pytest.mark.parametrize("strip_rows", ["", "1", "5", "16"])
@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_engine_matches_reference(monkeypatch, name, strip_rows, sparse):
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv(STRIP_ENV, strip_rows)
    monkeypatch.setenv(SPARSE_ENV, sparse)
    loss = LOSS_BY_NAME[name]
    for pattern, B in (("random", 37), ("two_views", 20), ("one_class", 9), ("all_distinct", 11), ("random", 1)):
        x = torch.randn(B, 7, dtype=torch.float64)
        y = labels_pattern(pattern, B)
        for reduction in ("mean", "sum", "none"):
            out, g = run(loss, "cpu", torch.device("cpu"), x, y, reduction=reduction)
            exp, eg = run_reference(loss, x, y, reduction=reduction)
            assert_tight(out, exp, rtol=1e-10, atol=1e-12, what=f"loss ({pattern}, {reduction})")
            assert_tight(g[0], eg[0], rtol=1e-9, atol=1e-12, what=f"grad ({pattern}, {reduction})")


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_engine_with_other_parameters_and_distances(monkeypatch, name):
    monkeypatch.setenv(STRIP_ENV, "6")
    loss = LOSS_BY_NAME[name]
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 6, (30,))
    out, g = run(loss, "cpu", torch.device("cpu"), x, y, params=loss.other)
    exp, eg = run_reference(loss, x, y, params=loss.other)
    assert_tight(out, exp, rtol=1e-10, atol=1e-12)
    assert_tight(g[0], eg[0], rtol=1e-9, atol=1e-12)
    if name in ("circle", "unified"):
        return  # cosine only
    dist = slf.LpDistance(power=2) if name != "contrastive" else slf.CosineSimilarity()
    kw = dict(pos_margin=0.8, neg_margin=0.2) if name == "contrastive" else {}
    fn = loss.fn
    results = {}
    for sym in ("0", "1"):
        monkeypatch.setenv(ENV, sym)
        xd = x.clone().requires_grad_()
        out = fn(xd, y, distance=dist, backend="cpu", **kw)
        out.backward()
        results[sym] = (out.detach(), xd.grad)
    assert_tight(results["1"][0], results["0"][0], rtol=1e-11, atol=1e-13)
    assert_tight(results["1"][1], results["0"][1], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_engine_float32_matches_strips_and_is_deterministic(monkeypatch, name):
    """B = 1100 in strips of 128 rows, float32: close to the strip engine, and the same bits run
    to run."""
    monkeypatch.setenv(STRIP_ENV, "128")
    x = torch.randn(1100, 32)
    y = torch.randint(0, 275, (1100,))
    loss = LOSS_BY_NAME[name]
    got = {}
    for sym in ("0", "1", "1"):
        monkeypatch.setenv(ENV, sym)
        xd = x.clone().requires_grad_()
        out = loss.fn(xd, y, backend="cpu", **loss.params, **loss.kw)
        out.backward()
        got.setdefault(sym, []).append((out.detach(), xd.grad))
    (l0, g0), = got["0"]
    (l1, g1), (l2, g2) = got["1"]
    assert torch.equal(l1, l2) and torch.equal(g1, g2), "the symmetric engine must be deterministic"
    assert_tight(l1, l0, rtol=1e-5, atol=1e-6)
    assert_tight(g1, g0, rtol=1e-4, atol=1e-5 * g0.abs().max().item())


def test_non_finite_embeddings_stay_non_finite(monkeypatch):
    monkeypatch.setenv(STRIP_ENV, "4")
    x = torch.randn(20, 6, dtype=torch.float64)
    x[13, 2] = float("nan")
    y = torch.randint(0, 4, (20,))
    for name in SYMMETRIC:
        loss = LOSS_BY_NAME[name]
        xd = x.clone().requires_grad_()
        out = loss.fn(xd, y, backend="cpu", **loss.params, **loss.kw)
        out.backward()
        assert not torch.isfinite(out), name
        assert xd.grad.isnan().any(), name


@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.02])  # 0.02: logits span 100, past the fixed shift
@pytest.mark.parametrize("raw", [False, True])
def test_supcon_shift_choices_match_reference(monkeypatch, temperature, raw):
    """SupCon's statistics use one shift for every anchor when the logits' span allows it (and
    the running maxima otherwise), with cosine and with raw dot products."""
    monkeypatch.setenv(STRIP_ENV, "7")
    x = torch.randn(33, 6, dtype=torch.float64) * (0.4 if raw else 1.0)
    y = torch.randint(0, 5, (33,))
    dist = slf.DotProductSimilarity(normalize_embeddings=False) if raw else None
    got = {}
    for sym in ("0", "1"):
        monkeypatch.setenv(ENV, sym)
        xd = x.clone().requires_grad_()
        out = slf.supcon_loss(xd, y, temperature=temperature, distance=dist, backend="cpu")
        out.backward()
        got[sym] = (out.detach(), xd.grad)
    assert_tight(got["1"][0], got["0"][0], rtol=1e-11, atol=1e-13)
    assert_tight(got["1"][1], got["0"][1], rtol=1e-10, atol=1e-13)
    if not raw:
        loss = LOSS_BY_NAME["supcon"]
        exp, eg = run_reference(loss, x, y, params=dict(temperature=temperature))
        out, g = run(loss, "cpu", torch.device("cpu"), x, y, params=dict(temperature=temperature))
        assert_tight(out, exp, rtol=1e-10, atol=1e-12)
        assert_tight(g[0], eg[0], rtol=1e-9, atol=1e-12)

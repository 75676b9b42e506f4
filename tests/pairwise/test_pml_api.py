"""pytorch-metric-learning (PML) as a drop-in: indices_tuple on every pairwise loss, PML's miners
(ours: same tuples, and fused into their loss's pass), distance=, reducer=,
embedding_regularizer=, CrossBatchMemory(miner=), SelfSupervisedLoss, labels=None, against PML
2.x in loss and gradient; the engine's distances (zero rows among them) on the CPU kernels and
the ATen epilogue; gradcheck and opcheck of the extended op; bad input."""
from __future__ import annotations

import os

import pytest
import torch
import structloss_fast as slf
from structloss_fast import _registry
from structloss_fast._ids import PairExtParam, PairMiner, PairValue
from structloss_fast.pairwise import _ops as ops
from structloss_fast.pairwise import _semantics, miners as our_miners, tuples

PL = pytest.importorskip("pytorch_metric_learning.losses")
PM = pytest.importorskip("pytorch_metric_learning.miners")
PD = pytest.importorskip("pytorch_metric_learning.distances")
PR = pytest.importorskip("pytorch_metric_learning.reducers")
PG = pytest.importorskip("pytorch_metric_learning.regularizers")

# name -> (our class, PML class, constructor arguments that differ from the defaults)
LOSSES = {
    "circle": (slf.CircleLoss, PL.CircleLoss, dict(m=0.25, gamma=64)),
    "multi_similarity": (slf.MultiSimilarityLoss, PL.MultiSimilarityLoss, {}),
    "supcon": (slf.SupConLoss, PL.SupConLoss, {}),
    "ntxent": (slf.NTXentLoss, PL.NTXentLoss, dict(temperature=0.1)),
    "contrastive": (slf.ContrastiveLoss, PL.ContrastiveLoss, dict(neg_margin=1.2)),
    "triplet": (slf.TripletMarginLoss, PL.TripletMarginLoss, dict(margin=0.2)),
}

PML_MINERS = {
    "multi_similarity": lambda: PM.MultiSimilarityMiner(0.1),
    "pair_margin": lambda: PM.PairMarginMiner(0.3, 0.9),
    "triplet_margin": lambda: PM.TripletMarginMiner(0.3),
    "batch_hard": lambda: PM.BatchHardMiner(),
    "batch_easy_hard": lambda: PM.BatchEasyHardMiner(),
}

EPILOGUE_ENV = "STRUCTLOSS_FAST_PAIRWISE_EPILOGUE"


def batch(B=48, D=8, classes=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, classes, (B,), generator=g)


def loss_and_grad(fn, x0, *more):
    xs = [t.clone().requires_grad_() for t in (x0,) + more]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [t.grad for t in xs]


def assert_same(ours, theirs, x0, *more, rtol=1e-9, atol=1e-11):
    a, ga = loss_and_grad(ours, x0, *more)
    b, gb = loss_and_grad(theirs, x0, *more)
    torch.testing.assert_close(a, b.to(a.dtype).reshape(a.shape), rtol=rtol, atol=atol)
    for u, v in zip(ga, gb):
        scale = max(v.abs().max().item(), 1.0)
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol * scale)


def as_sets(t):
    t = [u.tolist() for u in t]
    if len(t) != 4:
        return sorted(zip(*t))
    return sorted(zip(t[0], t[1])), sorted(zip(t[2], t[3]))


# ---------------------------------------------------------------- indices_tuple


@pytest.mark.parametrize("miner", sorted(PML_MINERS))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_indices_tuple_of_pml_miners_matches_pml(name, miner):
    ours, theirs, kw = LOSSES[name]
    x, y = batch()
    t = PML_MINERS[miner]()(x, y)
    assert_same(lambda e: ours(**kw)(e, y, t), lambda e: theirs(**kw)(e, y, t), x)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_indices_tuple_with_references_matches_pml(name):
    ours, theirs, kw = LOSSES[name]
    x, y = batch(24)
    r, ry = batch(40, seed=1)
    t = PM.MultiSimilarityMiner(0.2)(x, y, r, ry)
    assert_same(lambda e, f: ours(**kw)(e, y, t, f, ry), lambda e, f: theirs(**kw)(e, y, t, f, ry), x, r)


def test_indices_tuple_edge_cases_match_pml():
    x, y = batch(16)
    empty = torch.empty(0, dtype=torch.long)
    one = torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])
    dup = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2]), torch.tensor([0, 1, 1]), torch.tensor([3, 3, 4])
    for name, (ours, theirs, kw) in LOSSES.items():
        for t in [(empty, empty, empty, empty), one, dup, (torch.tensor([0, 1]), torch.tensor([2, 3]),
                                                        torch.tensor([4, 5]))]:
            assert_same(lambda e: ours(**kw)(e, y, t), lambda e: theirs(**kw)(e, y, t), x)


def test_labels_none_with_a_tuple_and_without():
    x, y = batch(16)
    t = PM.MultiSimilarityMiner()(x, y)
    for name in ("circle", "multi_similarity", "contrastive", "triplet"):
        ours, theirs, kw = LOSSES[name]
        assert_same(lambda e: ours(**kw)(e, None, t), lambda e: theirs(**kw)(e, None, t), x)
    with pytest.raises(ValueError, match="SelfSupervisedLoss"):
        slf.NTXentLoss()(x, None)


def test_a_pair_both_positive_and_negative_is_an_error():
    x, y = batch(8)
    t = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 4]), torch.tensor([1, 5])
    with pytest.raises(ValueError, match="both as positive and as negative"):
        slf.CircleLoss()(x, y, t)


@pytest.mark.parametrize("bad, exc, match", [
    ((torch.tensor([0]),) * 2, ValueError, "3 .* or 4"),
    ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), ValueError, r"indices_tuple\[0\] must be a 1-D integer"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])), ValueError, "one length"),
    ((torch.tensor([0]), torch.tensor([99]), torch.tensor([2])), ValueError, r"indices_tuple\[1\] must index \[0, 8\)"),
    ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), ValueError, r"indices_tuple\[0\] must index"),
    ("abc", TypeError, "indices_tuple must be a tuple"),
])
def test_bad_indices_tuple(bad, exc, match):
    x, y = batch(8)
    with pytest.raises(exc, match=match):
        slf.ContrastiveLoss()(x, y, bad)


# ---------------------------------------------------------------- miners


def _miner_cases():
    cases = [
        ("MultiSimilarityMiner", dict(epsilon=0.1)), ("MultiSimilarityMiner", dict(epsilon=0.3, distance="lp")),
        ("PairMarginMiner", {}), ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=0.3, distance="cos")),
        ("BatchHardMiner", {}), ("BatchHardMiner", dict(distance="cos")),
    ]
    cases += [("TripletMarginMiner", dict(margin=0.3, type_of_triplets=t)) for t in ("all", "hard", "semihard", "easy")]
    cases += [("TripletMarginMiner", dict(margin=0.2, type_of_triplets="semihard", distance="cos"))]
    for p in ("hard", "easy", "semihard", "all"):
        for n in ("hard", "easy", "semihard", "all"):
            if not (p == n == "semihard") and not ("all" in (p, n) and "semihard" in (p, n)):
                cases.append(("BatchEasyHardMiner", dict(pos_strategy=p, neg_strategy=n)))
    cases += [("BatchEasyHardMiner", dict(allowed_pos_range=(0.2, 1.0), allowed_neg_range=(0.3, 1.2))),
              ("BatchEasyHardMiner", dict(pos_strategy="easy", neg_strategy="semihard", distance="cos"))]
    return cases


def _make_miner(module, cls, kw):
    kw = dict(kw)
    dist = {"lp": (slf.LpDistance, PD.LpDistance), "cos": (slf.CosineSimilarity, PD.CosineSimilarity)}
    if "distance" in kw:
        ours_d, pml_d = dist[kw["distance"]]
        kw["distance"] = ours_d() if module is our_miners else pml_d()
    return getattr(module, cls)(**kw)


@pytest.mark.parametrize("cls, kw", _miner_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("refs", [False, True])
def test_miner_tuples_equal_pml(cls, kw, refs, monkeypatch):
    x, y = batch(40, classes=6)
    args = (x, y) + (batch(30, classes=6, seed=3) if refs else ())
    expected = as_sets(_make_miner(PM, cls, kw)(*args))
    assert as_sets(_make_miner(our_miners, cls, kw)(*args)) == expected
    monkeypatch.setattr(our_miners, "STRIP_ELEMS", 64)  # strips of one or two anchors: same tuples
    assert as_sets(_make_miner(our_miners, cls, kw)(*args)) == expected


def test_mined_tuple_is_lazy_and_sized():
    x, y = batch(16)
    t = slf.MultiSimilarityMiner()(x, y)
    assert len(t) == 4 and not t.materialized
    a1, p, a2, n = t
    assert t.materialized and a1.dtype == torch.long
    assert len(slf.BatchHardMiner()(x, y)) == 3


FUSED = [
    ("multi_similarity", "multi_similarity", lambda m: m.MultiSimilarityMiner(0.1)),
    ("circle", "multi_similarity", lambda m: m.MultiSimilarityMiner(0.2)),
    ("contrastive", "pair_margin", lambda m: m.PairMarginMiner(0.3, 0.9)),
    ("multi_similarity", "pair_margin_cos", lambda m: m.PairMarginMiner(0.6, 0.2, distance=m_dist(m, "cos"))),
    ("contrastive", "multi_similarity_lp", lambda m: m.MultiSimilarityMiner(0.1, distance=m_dist(m, "lp"))),
    ("triplet", "triplet_all", lambda m: m.TripletMarginMiner(0.3)),
    ("triplet", "triplet_hard", lambda m: m.TripletMarginMiner(0.3, "hard")),
    ("triplet", "triplet_semihard", lambda m: m.TripletMarginMiner(0.3, "semihard")),
    ("triplet", "triplet_easy", lambda m: m.TripletMarginMiner(0.3, "easy")),
    ("triplet", "batch_hard", lambda m: m.BatchHardMiner()),
    ("triplet", "easy_semihard", lambda m: m.BatchEasyHardMiner()),
    ("triplet", "semihard_easy", lambda m: m.BatchEasyHardMiner("semihard", "easy")),
]


def m_dist(module, kind):
    if module is PM:
        return PD.CosineSimilarity() if kind == "cos" else PD.LpDistance()
    return slf.CosineSimilarity() if kind == "cos" else slf.LpDistance()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, miner_name, make", FUSED, ids=[f"{a}-{b}" for a, b, _ in FUSED])
def test_fused_miner_matches_pml(name, miner_name, make, dtype):
    ours, theirs, kw = LOSSES[name]
    x, y = batch(64, D=16, classes=10, dtype=dtype)
    seen = []

    def ours_fn(e):
        t = make(our_miners)(e, y)
        seen.append(t)
        return ours(**kw)(e, y, t)

    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert_same(ours_fn, lambda e: theirs(**kw)(e, y, make(PM)(e, y)), x, **tol)
    assert not seen[0].materialized, "the miner was not fused into the loss's pass"


def test_fused_miner_with_references_and_reducer_matches_pml():
    x, y = batch(24)
    r, ry = batch(50, seed=2)
    red = PR.ThresholdReducer(low=0.05)
    assert_same(lambda e, f: slf.MultiSimilarityLoss(reducer=red)(e, y, slf.MultiSimilarityMiner()(e, y, f, ry), f, ry),
                lambda e, f: PL.MultiSimilarityLoss(reducer=red)(e, y, PM.MultiSimilarityMiner()(e, y, f, ry), f, ry),
                x, r)


def test_miner_not_fused_is_listed():
    """Another loss than the miner's, or other embeddings: the tuple is listed (same result)."""
    x, y = batch(32)
    t = slf.MultiSimilarityMiner()(x, y)
    assert_same(lambda e: slf.SupConLoss()(e, y, t), lambda e: PL.SupConLoss()(e, y, PM.MultiSimilarityMiner()(e, y)), x)
    assert t.materialized


# ---------------------------------------------------------------- distances


DISTANCES = [
    ("multi_similarity", lambda D: D.LpDistance()),
    ("multi_similarity", lambda D: D.LpDistance(power=2)),
    ("supcon", lambda D: D.DotProductSimilarity(normalize_embeddings=False)),
    ("supcon", lambda D: D.LpDistance()),
    ("ntxent", lambda D: D.LpDistance(normalize_embeddings=False)),
    ("contrastive", lambda D: D.CosineSimilarity()),
    ("contrastive", lambda D: D.LpDistance(normalize_embeddings=False)),
    ("contrastive", lambda D: D.LpDistance(power=2)),
    ("triplet", lambda D: D.CosineSimilarity()),
    ("triplet", lambda D: D.LpDistance(power=2, normalize_embeddings=False)),
]


@pytest.mark.parametrize("pml_objects", [False, True])
@pytest.mark.parametrize("epi", ["kernel", "aten"])
@pytest.mark.parametrize("name, make", DISTANCES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DISTANCES)])
def test_engine_distances_match_pml(name, make, epi, pml_objects, monkeypatch):
    ours, theirs, kw = LOSSES[name]
    if name == "contrastive" and "Cosine" in type(make(PD)).__name__:
        kw = dict(pos_margin=0.9, neg_margin=0.3)
    x, y = batch(40)
    monkeypatch.setenv(EPILOGUE_ENV, epi)
    assert_same(lambda e: ours(distance=make(PD if pml_objects else slf), backend="cpu", **kw)(e, y),
                lambda e: theirs(distance=make(PD), **kw)(e, y), x)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_distances_the_engine_lacks_are_listed(name):
    if name == "circle":
        pytest.skip("Circle takes cosine similarity only")
    ours, theirs, kw = LOSSES[name]
    x, y = batch(24)
    dist = PD.LpDistance(p=1) if not LOSSES[name][0] is slf.NTXentLoss else PD.DotProductSimilarity(power=2)
    assert_same(lambda e: ours(distance=dist, **kw)(e, y), lambda e: theirs(distance=dist, **kw)(e, y), x)
    with pytest.raises(_registry.BackendUnavailable, match="engine computes"):
        ours(distance=dist, backend="cpu", **kw)(x, y)


def test_circle_takes_cosine_only():
    x, y = batch(8)
    with pytest.raises(ValueError, match="takes distance=CosineSimilarity only"):
        slf.CircleLoss(distance=slf.LpDistance())(x, y)
    with pytest.raises(TypeError, match="distance must be"):
        slf.MultiSimilarityLoss(distance="cosine")(x, y)


@pytest.mark.parametrize("epi", ["kernel", "aten"])
@pytest.mark.parametrize("name", ["contrastive", "triplet"])
def test_zero_rows_distance_is_one(name, epi, monkeypatch):
    """F.normalize leaves a zero row at 0: its distance to a unit row is 1, not sqrt(2)."""
    ours, theirs, kw = LOSSES[name]
    x, y = batch(32, classes=5)
    x[3] = 0
    x[9] = 0
    monkeypatch.setenv(EPILOGUE_ENV, epi)
    a = ours(backend="cpu", **kw)(x, y)
    b = theirs(**kw)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    ref = torch.randn(20, 8, dtype=torch.float64)
    ref[4] = 0
    ry = torch.randint(0, 5, (20,))
    torch.testing.assert_close(ours(backend="cpu", **kw)(x, y, ref_emb=ref, ref_labels=ry),
                               theirs(**kw)(x, y, ref_emb=ref, ref_labels=ry), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- reducers and regularizers


REDUCERS = {
    "mean": lambda R: R.MeanReducer(), "sum": lambda R: R.SumReducer(), "avg_non_zero": lambda R: R.AvgNonZeroReducer(),
    "threshold": lambda R: R.ThresholdReducer(0.1, 3.0), "threshold_high": lambda R: R.ThresholdReducer(high=0.5),
    "per_anchor": lambda R: R.PerAnchorReducer(), "per_anchor_threshold": lambda R: R.PerAnchorReducer(R.ThresholdReducer(low=0.01)),
    "class_weighted": lambda R: R.ClassWeightedReducer(torch.linspace(0.1, 1.0, 8, dtype=torch.float64)),
}


@pytest.mark.parametrize("mined", [False, True])
@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reducers_match_pml(name, reducer, mined):
    if name == "triplet" and reducer.startswith("per_anchor"):
        pytest.skip("PML's PerAnchorReducer has no triplet reduction")
    ours, theirs, kw = LOSSES[name]
    x, y = batch(40)
    t = PM.MultiSimilarityMiner()(x, y) if mined else None
    if reducer == "class_weighted" and name in ("circle", "multi_similarity"):
        # PML keeps these losses' per-anchor values as (B, 1) and broadcasts them against the (B,)
        # weights into B x B; the definition is each anchor's loss times its class weight.
        w = REDUCERS[reducer](PR).weights
        per_anchor = lambda e: theirs(reducer=PR.DoNothingReducer(), **kw)(e, y, t)["loss"]["losses"].reshape(-1)
        assert_same(lambda e: ours(reducer=REDUCERS[reducer](slf), **kw)(e, y, t),
                    lambda e: (per_anchor(e) * w[y]).mean(), x)
        return
    for objects in (slf, PR):
        assert_same(lambda e: ours(reducer=REDUCERS[reducer](objects), **kw)(e, y, t),
                    lambda e: theirs(reducer=REDUCERS[reducer](PR), **kw)(e, y, t), x)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_do_nothing_reducer_returns_pml_elements(name):
    ours, theirs, kw = LOSSES[name]
    x, y = batch(24)
    a = ours(reducer=slf.DoNothingReducer(), **kw)(x, y)
    b = theirs(reducer=PR.DoNothingReducer(), **kw)(x, y)
    assert set(a) == set(b)
    for k in b:
        assert a[k]["reduction_type"] == b[k]["reduction_type"]
        la, lb = a[k]["losses"], b[k]["losses"]
        if not torch.is_tensor(lb):
            continue
        torch.testing.assert_close(la.reshape(-1).sort().values, lb.reshape(-1).sort().values)
        if a[k]["reduction_type"] != "element":  # the same elements (as sets)
            assert as_sets(a[k]["indices"]) == as_sets(b[k]["indices"])


def test_divisor_reducer_needs_a_divisor():
    x, y = batch(8)
    with pytest.raises(ValueError, match="supplies a divisor"):
        slf.ContrastiveLoss(reducer=PR.DivisorReducer())(x, y)


def test_multiple_reducers_match_pml():
    x, y = batch(24)
    red = lambda R: R.MultipleReducers({"pos_loss": R.MeanReducer(), "neg_loss": R.ThresholdReducer(low=0.2)})
    assert_same(lambda e: slf.ContrastiveLoss(reducer=red(slf))(e, y), lambda e: PL.ContrastiveLoss(reducer=red(PR))(e, y), x)


def test_reducer_replaces_reduction():
    x, y = batch(8)
    with pytest.raises(ValueError, match="reducer= replaces reduction="):
        slf.CircleLoss(reducer=slf.MeanReducer(), reduction="sum")(x, y)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_embedding_regularizer_matches_pml(name):
    ours, theirs, kw = LOSSES[name]
    x, y = batch(24)
    for reg in (lambda G: G.LpRegularizer(), lambda G: G.LpRegularizer(p=1, power=2)):
        for objects in (slf, PG):
            assert_same(lambda e: ours(embedding_regularizer=reg(objects), embedding_reg_weight=0.3, **kw)(e, y),
                        lambda e: theirs(embedding_regularizer=reg(PG), embedding_reg_weight=0.3, **kw)(e, y), x)


# ---------------------------------------------------------------- wrappers


XBM_MINERS = {"none": (None, None), "multi_similarity": (slf.MultiSimilarityMiner, PM.MultiSimilarityMiner),
              "pair_margin": (slf.PairMarginMiner, PM.PairMarginMiner),
              "batch_hard": (slf.BatchHardMiner, PM.BatchHardMiner),
              "batch_easy_hard": (slf.BatchEasyHardMiner, PM.BatchEasyHardMiner),
              "triplet_margin": (slf.TripletMarginMiner, PM.TripletMarginMiner)}


def _xbm_steps(ours, theirs, steps=4, B=24, D=8, classes=6, mask=False):
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(B, D, generator=gen, dtype=torch.float64)
        y = torch.randint(0, classes, (B,), generator=gen)
        kw = {}
        if mask:
            kw["enqueue_mask"] = torch.rand(B, generator=gen) < 0.5
        assert_same(lambda e: ours(e, y, **kw), lambda e: theirs(e, y, **kw), x)


@pytest.mark.parametrize("miner", sorted(XBM_MINERS))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cross_batch_memory_with_miner_matches_pml(name, miner):
    ours, theirs, kw = LOSSES[name]
    om, tm = XBM_MINERS[miner]
    _xbm_steps(slf.CrossBatchMemory(ours(**kw), 8, 64, miner=om() if om else None),
               PL.CrossBatchMemory(theirs(**kw), 8, 64, miner=tm() if tm else None))


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "triplet"])
def test_cross_batch_memory_mixes_with_pml(name):
    ours, theirs, kw = LOSSES[name]
    expected = lambda: PL.CrossBatchMemory(theirs(**kw), 8, 64, miner=PM.MultiSimilarityMiner())
    _xbm_steps(PL.CrossBatchMemory(ours(**kw), 8, 64, miner=PM.MultiSimilarityMiner()), expected())
    _xbm_steps(slf.CrossBatchMemory(theirs(**kw), 8, 64, miner=PM.MultiSimilarityMiner()), expected())
    _xbm_steps(slf.CrossBatchMemory(ours(**kw), 8, 64, miner=slf.MultiSimilarityMiner()), expected(), mask=False)


def test_cross_batch_memory_given_tuple_and_mask_match_pml():
    x, y = batch(16)
    t = PM.BatchHardMiner()(x, y)
    ours = slf.CrossBatchMemory(slf.ContrastiveLoss(), 8, 64, miner=slf.MultiSimilarityMiner())
    theirs = PL.CrossBatchMemory(PL.ContrastiveLoss(), 8, 64, miner=PM.MultiSimilarityMiner())
    assert_same(lambda e: ours(e, y, t), lambda e: theirs(e, y, t), x)
    _xbm_steps(slf.CrossBatchMemory(slf.CircleLoss(), 8, 64, miner=slf.MultiSimilarityMiner()),
               PL.CrossBatchMemory(PL.CircleLoss(), 8, 64, miner=PM.MultiSimilarityMiner()), mask=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(x, y, t, enqueue_mask=torch.ones(16, dtype=torch.bool))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["ntxent", "supcon", "triplet", "contrastive"])
def test_self_supervised_loss_matches_pml(name, symmetric):
    ours, theirs, kw = LOSSES[name]
    x, _ = batch(20)
    v, _ = batch(20, seed=5)
    assert_same(lambda a, b: slf.SelfSupervisedLoss(ours(**kw), symmetric=symmetric)(a, b),
                lambda a, b: PL.SelfSupervisedLoss(theirs(**kw), symmetric=symmetric)(a, b), x, v)
    with pytest.raises(ValueError, match="must have the shape of embeddings"):
        slf.SelfSupervisedLoss(ours())(x, v[:3])


def test_semantics_table_is_documented():
    page = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "pairwise.md")).read()
    assert _semantics.markdown_table() in page


# ---------------------------------------------------------------- gradients of the extended engine


def fixed_pairs(y):
    """Every other positive and negative pair (a tuple that does not depend on the embeddings)."""
    a1, p, a2, n = tuples.all_pairs(y, None, None, y.shape[0])
    return a1[::2], p[::2], a2[::3], n[::3]


GRADCHECK = [
    ("ms-lp", lambda e, y: slf.multi_similarity_loss(e, y, distance=slf.LpDistance(), backend="cpu")),
    ("contrastive-cos", lambda e, y: slf.contrastive_loss(e, y, pos_margin=0.9, neg_margin=0.1,
                                                          distance=slf.CosineSimilarity(), backend="cpu")),
    ("triplet-pow2", lambda e, y: slf.triplet_margin_loss(e, y, margin=0.5, distance=slf.LpDistance(power=2),
                                                          backend="cpu")),
    ("contrastive-raw", lambda e, y: slf.contrastive_loss(e, y, neg_margin=4.0, backend="cpu",
                                                          distance=slf.LpDistance(normalize_embeddings=False))),
    ("supcon-dot-raw", lambda e, y: slf.supcon_loss(e, y, backend="cpu",
                                                    distance=slf.DotProductSimilarity(normalize_embeddings=False))),
    ("ms-fused-miner", lambda e, y: slf.multi_similarity_loss(e, y, indices_tuple=slf.MultiSimilarityMiner(0.3)(e, y),
                                                              backend="cpu")),
    ("contrastive-fused-miner", lambda e, y: slf.contrastive_loss(
        e, y, neg_margin=1.3, indices_tuple=slf.PairMarginMiner(0.2, 1.1)(e, y), backend="cpu")),
    ("triplet-fused-window", lambda e, y: slf.triplet_margin_loss(
        e, y, margin=0.4, indices_tuple=slf.TripletMarginMiner(0.5)(e, y), backend="cpu")),
    ("triplet-fused-easy-hard", lambda e, y: slf.triplet_margin_loss(
        e, y, margin=0.5, indices_tuple=slf.BatchEasyHardMiner("easy", "hard")(e, y), backend="cpu")),
    ("circle-threshold", lambda e, y: slf.circle_loss(e, y, reducer=slf.ThresholdReducer(0.5, 80.0), backend="cpu")),
    ("contrastive-class-weighted", lambda e, y: slf.contrastive_loss(
        e, y, reducer=slf.ClassWeightedReducer(torch.linspace(0.2, 1, 4, dtype=torch.float64)), backend="cpu")),
    ("listed-unified", lambda e, y: slf.unified_loss(e, y, indices_tuple=fixed_pairs(y))),  # (Circle: alphas detached)
    ("listed-ntxent", lambda e, y: slf.ntxent_loss(e, y, indices_tuple=fixed_pairs(y))),
    ("listed-triplet-swap", lambda e, y: slf.triplet_margin_loss(e, y, margin=0.5, swap=True,
                                                                 indices_tuple=fixed_pairs(y))),
    ("listed-contrastive-p1", lambda e, y: slf.contrastive_loss(e, y, neg_margin=3.0, distance=slf.LpDistance(p=1))),
]


@pytest.mark.parametrize("sparse", ["0", "1"])
@pytest.mark.parametrize("name, fn", GRADCHECK, ids=[n for n, _ in GRADCHECK])
def test_gradcheck_float64(name, fn, sparse, monkeypatch):
    monkeypatch.setenv("STRUCTLOSS_FAST_PAIRWISE_SPARSE", sparse)
    x, _ = batch(12, D=5)
    y = torch.arange(12) % 4
    x.requires_grad_()
    # The miners' selections must not flip under the finite differences: they are mined once.
    torch.autograd.gradcheck(lambda e: fn(e, y), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def _ext(value=PairValue.GEMM, power=1.0, raw=0.0, miner=PairMiner.NONE, mp=(0.0, 0.0, 0.0)):
    ext = [0.0] * len(PairExtParam)
    ext[PairExtParam.VALUE], ext[PairExtParam.POWER], ext[PairExtParam.RAW_NORMS] = float(value), power, raw
    ext[PairExtParam.MINER] = float(miner)
    ext[PairExtParam.MINER0:PairExtParam.MINER0 + 3] = mp
    return ext


OPCHECK = [
    ("multi_similarity", [2.0, 50.0, -0.5], _ext(PairValue.NEG_DIST_POW, 2.0)),
    ("contrastive", [-0.9, -0.2], _ext(PairValue.NEG_GEMM)),
    ("triplet_all", [0.2], _ext(PairValue.DIST_POW, 2.0)),
    ("contrastive", [0.0, 3.0], _ext(raw=1.0)),
    ("multi_similarity", [2.0, 50.0, 0.5], _ext(miner=PairMiner.MULTI_SIMILARITY, mp=(0.1, 0.0, 0.0))),
    ("contrastive", [0.0, 1.0], _ext(miner=PairMiner.PAIR_MARGIN, mp=(-0.2, -0.9, 0.0))),
    ("triplet_all", [0.1], _ext(miner=PairMiner.TRIPLET_WINDOW, mp=(float("-inf"), 0.3, 0.0))),
    ("triplet_hard", [0.1], _ext(miner=PairMiner.EASY_HARD, mp=(1.0, 2.0, 0.0))),
]


@pytest.mark.parametrize("grad_mode", [0, 1])
@pytest.mark.parametrize("name, params, ext", OPCHECK, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(OPCHECK)])
def test_opcheck_extended_params(name, params, ext, grad_mode):
    if ext[PairExtParam.RAW_NORMS] and grad_mode:
        pytest.skip("rows that are not normalized take their gradient from the backward op")
    x, y = batch(10, D=4)
    x = torch.nn.functional.normalize(x, dim=1) if not ext[PairExtParam.RAW_NORMS] else x
    x.requires_grad_()
    loss = ops.LOSSES[name]
    y = y.to(torch.int64) % 3
    args = (x, y, x, y, 0, True, loss, params + ext, grad_mode)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss.default, args)
    stats = torch.ops.structloss_fast.pairwise_loss(*args)[0].detach()
    w = torch.randn(10, ops.terms(loss), dtype=x.dtype)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_backward.default,
                          (x.detach(), y, x.detach(), y, stats, w, 0, True, loss, params + ext, False))


def test_op_rejects_a_miner_its_loss_does_not_fuse():
    x, y = batch(6, D=4)
    with pytest.raises(RuntimeError, match="does not fuse miner"):
        torch.ops.structloss_fast.pairwise_loss(x, y, x, y, 0, True, ops.LOSSES["supcon"],
                                               [0.1] + _ext(miner=PairMiner.MULTI_SIMILARITY), 0)


def test_triton_refuses_extended_problems():
    why = _registry.unsupported_reason(ops.OP, "triton", x=torch.zeros(2, 4), loss=0, extended=True)
    assert why and "cosine similarities only" in why
    assert _registry.unsupported_reason(ops.OP, "cuda", x=torch.zeros(2, 4), loss=0, miner=True)


# ---------------------------------------------------------------- a PML training loop, imports changed


def pml_training_loop(L, M, D, R, G, steps=4):
    """A training loop written against pytorch-metric-learning's modules, parametrized by them:
    losses, miners, distances, reducers, regularizers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    circle = L.CircleLoss(m=0.25, gamma=64, reducer=R.ThresholdReducer(low=0.01),
                          embedding_regularizer=G.LpRegularizer(), embedding_reg_weight=0.1)
    ms_miner = M.MultiSimilarityMiner(epsilon=0.1)
    xbm = L.CrossBatchMemory(L.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance=D.CosineSimilarity()),
                             embedding_size=8, memory_size=96,
                             miner=M.PairMarginMiner(pos_margin=0.9, neg_margin=0.2, distance=D.CosineSimilarity()))
    triplet = L.TripletMarginLoss(margin=0.1, reducer=R.MeanReducer())
    semihard = M.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    ssl = L.SelfSupervisedLoss(L.NTXentLoss(temperature=0.2))
    gen = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 6, (32,), generator=gen)
        emb = model(x)
        view = model(x + 0.1 * torch.randn(32, 12, generator=gen, dtype=torch.float64))
        loss = (circle(emb, y, ms_miner(emb, y)) + xbm(emb, y) + triplet(emb, y, semihard(emb, y))
                + ssl(emb, view))
        opt.zero_grad()
        loss.backward()
        record.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def test_a_pml_training_loop_ports_by_changing_imports():
    from pytorch_metric_learning import distances, losses, miners, reducers, regularizers
    from structloss_fast.pairwise import distances as d2, losses as l2, miners as m2, reducers as r2, regularizers as g2

    theirs = pml_training_loop(losses, miners, distances, reducers, regularizers)
    ours = pml_training_loop(l2, m2, d2, r2, g2)
    for (la, ga), (lb, gb) in zip(ours, theirs):
        torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-11)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)

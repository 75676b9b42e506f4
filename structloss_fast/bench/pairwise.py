"""Benchmark cases of the pairwise family: structloss_fast against pytorch-metric-learning (PML),
the dense PyTorch reference and, for Circle loss, the GEMM floor."""
from __future__ import annotations

import torch

from . import Case, fwd_bwd_provider, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def make_batch(size: dict, device, requires_grad=True, seed=0):
    """Embeddings (B, D) and labels with about 4 samples per class (a typical P x K batch)."""
    g = torch.Generator().manual_seed(seed)
    B, D = size["B"], size["D"]
    dtype = DTYPES[size.get("dtype", "float32")]
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    y = torch.randint(0, max(B // size.get("per_class", 4), 1), (B,), generator=g).to(device)
    return x, y


def fwd_bwd(loss_fn):
    return fwd_bwd_provider(make_batch, loss_fn)


def _slf(name, backend="auto", **kw):
    def call(x, y):
        import structloss_fast as slf

        return getattr(slf, name)(x, y, backend=backend, **kw)

    return call


def _reference(name, **kw):
    def call(x, y):
        from structloss_fast.pairwise import reference as ref

        return getattr(ref, name)(x, y, **kw)

    return call


def _pml(cls_name, **kw):
    def setup(size, device):
        from pytorch_metric_learning import losses

        return fwd_bwd(getattr(losses, cls_name)(**kw))(size, device)

    return setup


def gemm_floor(products: int):
    """`products` (B x D) @ (D x B) products alone (torch.mm): three are what a strip engine's
    forward+backward multiplies, two the symmetric engine's (each pair once, used for both of
    its anchors). Above 8192 rows the products are taken in 8192-row chunks (same FLOPs,
    bounded memory)."""
    def setup(size, device):
        x, _ = make_batch(size, device, requires_grad=False)
        B = x.shape[0]
        chunk = min(B, 8192)
        out = torch.empty(chunk, B, device=device, dtype=x.dtype)
        xt = x.t()

        def run():
            for _ in range(products):
                for r in range(0, B, chunk):
                    n = min(chunk, B - r)
                    torch.mm(x[r:r + n], xt, out=out[:n])

        return run

    return setup


mm_floor = gemm_floor(3)
two_gemm_floor = gemm_floor(2)


def strip_engine(provider):
    """The same provider with the symmetric engine switched off (the strip engine's three products)."""
    def setup(size, device):
        import os

        os.environ["STRUCTLOSS_FAST_PAIRWISE_SYMMETRIC"] = "0"  # each provider runs in its own process
        return provider(size, device)

    return setup


def dense_skip(provider, size, device):
    """Skip the dense B x B providers where they cannot fit (about 15 B x B fp32 temporaries)."""
    if provider in ("pml", "dense_reference") and device == "cpu" and size["B"] > 16384:
        est = 15 * size["B"] ** 2 * 4 / 2**30
        return f"dense B x B temporaries need about {est:.0f} GB"
    if provider.startswith("structloss_fast:") and device != "cuda":
        return "GPU-only provider"
    return None


register(Case(
    family="pairwise",
    name="circle_loss",
    description="Circle loss (m=0.4, gamma=80), D=128, ~4 samples per class",
    providers={
        "structloss_fast": fwd_bwd(_slf("circle_loss")),
        "structloss_fast:strips": strip_engine(fwd_bwd(_slf("circle_loss"))),
        "structloss_fast:cuda-strip": fwd_bwd(_slf("circle_loss", backend="cuda")),
        "pml": _pml("CircleLoss", m=0.4, gamma=80),
        "dense_reference": fwd_bwd(_reference("circle_loss")),
        "mm_floor": mm_floor,
        "two_gemm_floor": two_gemm_floor,
    },
    sizes=[{"B": 8192, "D": 128}],
    full_sizes=[{"B": 2048, "D": 128}, {"B": 8192, "D": 128}, {"B": 65536, "D": 128}],
    reference_points=("mm_floor", "two_gemm_floor"),
    ours=("structloss_fast", "structloss_fast:strips", "structloss_fast:cuda-strip"),
    skip=dense_skip,
))

register(Case(
    family="pairwise",
    name="circle_loss_bf16",
    description="Circle loss in bfloat16 on the GPU (Triton), D=256",
    providers={
        "structloss_fast": fwd_bwd(_slf("circle_loss")),
        "pml": _pml("CircleLoss", m=0.4, gamma=80),
        "dense_reference": fwd_bwd(_reference("circle_loss")),
    },
    sizes=[{"B": 16384, "D": 256, "dtype": "bfloat16"}],
    full_sizes=[{"B": 16384, "D": 256, "dtype": "bfloat16"}, {"B": 65536, "D": 256, "dtype": "bfloat16"}],
    devices=("cuda",),
))

register(Case(
    family="pairwise",
    name="unified_loss",
    description="the paper's unified loss (m=0.35, gamma=64), D=128",
    providers={
        "structloss_fast": fwd_bwd(_slf("unified_loss")),
        "dense_reference": fwd_bwd(_reference("unified_loss")),
    },
    sizes=[{"B": 2048, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}, {"B": 65536, "D": 128}],
    skip=dense_skip,
))


def pml_skip(limits, limits_reason="PML materializes a (positive pairs) x (negative pairs) tensor: out of memory "
                                   "at this B"):
    """Skip PML where its documented memory blow-up makes the run impossible on 24 GB."""
    def skip(provider, size, device):
        if provider.startswith("structloss_fast:") and device != "cuda":
            return "GPU-only provider"
        if provider == "pml" and device == "cpu" and size["B"] > limits:
            return limits_reason
        return None
    return skip


# PML's defaults, no miner, each loss at a default size that PML handles in a few seconds and at
# the target size B = 8192 with --full.
for _name, _pml_name, _fn, _kw, _default_b, _pml_limit in [
    ("multi_similarity_loss", "MultiSimilarityLoss", "multi_similarity_loss", {}, 2048, 10**9),
    ("supcon_loss", "SupConLoss", "supcon_loss", {}, 2048, 10**9),
    ("contrastive_loss", "ContrastiveLoss", "contrastive_loss", {}, 2048, 10**9),
    ("triplet_margin_loss_all", "TripletMarginLoss", "triplet_margin_loss", {}, 1024, 10**9),
]:
    _symmetric = _fn in ("multi_similarity_loss", "supcon_loss", "contrastive_loss")
    register(Case(
        family="pairwise",
        name=_name,
        description=f"{_fn} (PML defaults), D=128, ~4 samples per class",
        providers={
            "structloss_fast": fwd_bwd(_slf(_fn, **_kw)),
            **({"structloss_fast:strips": strip_engine(fwd_bwd(_slf(_fn, **_kw)))} if _symmetric else {}),
            "structloss_fast:cuda-strip": fwd_bwd(_slf(_fn, backend="cuda", **_kw)),
            "pml": _pml(_pml_name),
            **({"two_gemm_floor": two_gemm_floor} if _symmetric else {}),
        },
        sizes=[{"B": _default_b, "D": 128}],
        full_sizes=[{"B": 8192, "D": 128}],
        ours=("structloss_fast", "structloss_fast:strips", "structloss_fast:cuda-strip"),
        reference_points=("two_gemm_floor",),
        skip=pml_skip(_pml_limit),
    ))


def _pml_batch_hard(size, device):
    from pytorch_metric_learning import losses, miners

    loss, miner = losses.TripletMarginLoss(), miners.BatchHardMiner()
    return fwd_bwd(lambda x, y: loss(x, y, miner(x, y)))(size, device)


register(Case(
    family="pairwise",
    name="triplet_margin_loss_batch_hard",
    description="triplet margin loss (margin=0.05) on each anchor's hardest positive and negative, D=128",
    providers={
        "structloss_fast": fwd_bwd(_slf("triplet_margin_loss", mining="batch_hard")),
        "structloss_fast:cuda-strip": fwd_bwd(_slf("triplet_margin_loss", mining="batch_hard", backend="cuda")),
        "pml": _pml_batch_hard,
    },
    sizes=[{"B": 2048, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}],
    ours=("structloss_fast", "structloss_fast:cuda-strip"),
    skip=pml_skip(10**9),
))

register(Case(
    family="pairwise",
    name="ntxent_loss",
    description="NT-Xent (t=0.07); per_class=2 is the two-views-per-class (SimCLR) batch",
    providers={
        "structloss_fast": fwd_bwd(_slf("ntxent_loss")),
        "structloss_fast:cuda-strip": fwd_bwd(_slf("ntxent_loss", backend="cuda")),
        "pml": _pml("NTXentLoss"),
    },
    sizes=[{"B": 256, "D": 128, "per_class": 2}],
    full_sizes=[{"B": 768, "D": 128, "per_class": 2}, {"B": 4096, "D": 128, "per_class": 2},
                {"B": 8192, "D": 128}],
    ours=("structloss_fast", "structloss_fast:cuda-strip"),
    skip=pml_skip(768),
))


# ---------------------------------------------------------------- PML's keywords: miners, tuples, reducers


def _mined(loss_fn, miner_fn):
    """loss(x, y, miner(x, y)): both built once, as in a training loop."""
    def setup(size, device):
        loss, miner = loss_fn(), miner_fn()
        return fwd_bwd(lambda x, y: loss(x, y, miner(x, y)))(size, device)

    return setup


def _ours(cls, *args, **kw):
    def make():
        import structloss_fast as slf

        return getattr(slf, cls)(*args, **kw)

    return make


def _theirs(module, cls, *args, **kw):
    def make():
        import importlib

        return getattr(importlib.import_module(f"pytorch_metric_learning.{module}"), cls)(*args, **kw)

    return make


# (case, our loss, our miner, PML's loss, PML's miner, default B): the miner fused into its loss's
# pass (ours) against PML's miner + loss, each in its training-loop form.
for _name, _ol, _om, _tl, _tm, _b in [
    ("multi_similarity_loss_mined", _ours("MultiSimilarityLoss"), _ours("MultiSimilarityMiner", 0.1),
     _theirs("losses", "MultiSimilarityLoss"), _theirs("miners", "MultiSimilarityMiner", 0.1), 2048),
    ("circle_loss_ms_miner", _ours("CircleLoss"), _ours("MultiSimilarityMiner", 0.1),
     _theirs("losses", "CircleLoss"), _theirs("miners", "MultiSimilarityMiner", 0.1), 2048),
    ("contrastive_loss_pair_margin_miner", _ours("ContrastiveLoss"), _ours("PairMarginMiner"),
     _theirs("losses", "ContrastiveLoss"), _theirs("miners", "PairMarginMiner"), 2048),
    ("triplet_margin_loss_semihard_miner", _ours("TripletMarginLoss", 0.1),
     _ours("TripletMarginMiner", 0.2, "semihard"), _theirs("losses", "TripletMarginLoss", 0.1),
     _theirs("miners", "TripletMarginMiner", 0.2, "semihard"), 1024),
    ("triplet_margin_loss_easy_semihard_miner", _ours("TripletMarginLoss", 0.1), _ours("BatchEasyHardMiner"),
     _theirs("losses", "TripletMarginLoss", 0.1), _theirs("miners", "BatchEasyHardMiner"), 2048),
]:
    register(Case(
        family="pairwise",
        name=_name,
        description="a miner and its loss as a PML training loop calls them (ours: the miner fused into the "
                    "loss's pass), D=128, ~4 samples per class",
        providers={"structloss_fast": _mined(_ol, _om), "pml": _mined(_tl, _tm)},
        sizes=[{"B": _b, "D": 128}],
        full_sizes=[{"B": 8192, "D": 128}],
        # PML's TripletMarginMiner lists every triplet from a B x B x B mask (8 GB at B = 2048).
        skip=pml_skip(1024 if _name == "triplet_margin_loss_semihard_miner" else 10**9),
    ))


def _listed_tuple(loss_fn):
    """The loss on a PML miner's tuple (mined once, outside the measured step)."""
    def setup(size, device):
        from pytorch_metric_learning import miners

        loss = loss_fn()
        x, y = make_batch(size, device)
        t = miners.PairMarginMiner(pos_margin=0.2, neg_margin=1.2)(x, y)

        def run():
            loss(x, y, t).backward()
            x.grad = None

        return run

    return setup


register(Case(
    family="pairwise",
    name="contrastive_loss_given_tuple",
    description="ContrastiveLoss on a given indices_tuple (PML's PairMarginMiner(0.2, 1.2) pairs: the positives and "
                "the negatives nearer than 1.2): ours reads the listed pairs only (O(pairs x D)), PML builds the B x B "
                "distance matrix",
    providers={"structloss_fast": _listed_tuple(_ours("ContrastiveLoss")),
               "pml": _listed_tuple(_theirs("losses", "ContrastiveLoss"))},
    sizes=[{"B": 2048, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}],
    skip=pml_skip(10**9),
))


def _with_reducer(loss_fn, reducer_fn):
    def setup(size, device):
        loss = loss_fn(reducer=reducer_fn())
        return fwd_bwd(lambda x, y: loss(x, y))(size, device)

    return setup


register(Case(
    family="pairwise",
    name="circle_loss_threshold_reducer",
    description="CircleLoss with ThresholdReducer(low=1, high=200) (the reducer over the per-anchor losses, "
                "exact gradient through the recomputing backward)",
    providers={
        "structloss_fast": _with_reducer(lambda **kw: _ours("CircleLoss", **kw)(),
                                         _ours("ThresholdReducer", 1.0, 200.0)),
        "pml": _with_reducer(lambda **kw: _theirs("losses", "CircleLoss", **kw)(),
                             _theirs("reducers", "ThresholdReducer", 1.0, 200.0)),
    },
    sizes=[{"B": 2048, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}],
    skip=pml_skip(10**9),
))


def _miner_only(miner_fn):
    def setup(size, device):
        miner = miner_fn()
        x, y = make_batch(size, device, requires_grad=False)

        def run():
            tuple(miner(x, y))  # materialized

        return run

    return setup


register(Case(
    family="pairwise",
    name="multi_similarity_miner_tuples",
    description="MultiSimilarityMiner's index tuples alone (ours in strips of anchors, never B x B)",
    providers={"structloss_fast": _miner_only(_ours("MultiSimilarityMiner", 0.1)),
               "pml": _miner_only(_theirs("miners", "MultiSimilarityMiner", 0.1))},
    sizes=[{"B": 2048, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}],
    mode="forward",
))


# ---------------------------------------------------------------- the losses ported from PML

# (case, PML class, our function, default B, PML's largest B here, what PML builds densely)
for _name, _pml_name, _fn, _default_b, _limit, _why in [
    ("generalized_lifted_structure_loss", "GeneralizedLiftedStructureLoss", "generalized_lifted_structure_loss", 2048,
     8192, "B x B masks and distances"),
    ("npairs_loss", "NPairsLoss", "npairs_loss", 2048, 8192, "B x B label matches to find the pairs"),
    ("tuplet_margin_loss", "TupletMarginLoss", "tuplet_margin_loss", 256, 256,
     "PML materializes a (positive pairs) x (negative pairs) tensor, about 3 B^3 values: out of memory above B = 256"),
    ("margin_loss", "MarginLoss", "margin_based_loss", 1024, 2048,
     "PML lists every triplet (about 3 B^2 index triples and B^3 bytes of masks): out of memory above B = 2048"),
    ("fastap_loss", "FastAPLoss", "fastap_loss", 2048, 4096,
     "PML builds (num_bins + 1) x B x B pulses several times: out of memory above B = 4096"),
]:
    register(Case(
        family="pairwise",
        name=_name,
        description=f"{_fn} (PML's defaults) vs PML's {_pml_name}, D=128, ~4 samples per class",
        providers={
            "structloss_fast": fwd_bwd(_slf(_fn)),
            "structloss_fast:cuda-strip": fwd_bwd(_slf(_fn, backend="cuda")),
            "pml": _pml(_pml_name),
        },
        sizes=[{"B": _default_b, "D": 128}],
        full_sizes=[{"B": b, "D": 128} for b in sorted({_limit, 8192})],
        ours=("structloss_fast", "structloss_fast:cuda-strip"),
        skip=pml_skip(_limit, _why),
    ))

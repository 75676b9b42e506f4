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


def mm_floor(size, device):
    """The three (B x D) @ (D x B) products of a fused forward+backward, alone (torch.mm).
    Above 8192 rows the products are taken in 8192-row chunks (same FLOPs, bounded memory)."""
    x, _ = make_batch(size, device, requires_grad=False)
    B = x.shape[0]
    chunk = min(B, 8192)
    out = torch.empty(chunk, B, device=device, dtype=x.dtype)
    xt = x.t()

    def run():
        for _ in range(3):
            for r in range(0, B, chunk):
                n = min(chunk, B - r)
                torch.mm(x[r:r + n], xt, out=out[:n])

    return run


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
        "structloss_fast:cuda-strip": fwd_bwd(_slf("circle_loss", backend="cuda")),
        "pml": _pml("CircleLoss", m=0.4, gamma=80),
        "dense_reference": fwd_bwd(_reference("circle_loss")),
        "mm_floor": mm_floor,
    },
    sizes=[{"B": 8192, "D": 128}],
    full_sizes=[{"B": 2048, "D": 128}, {"B": 8192, "D": 128}, {"B": 65536, "D": 128}],
    reference_points=("mm_floor",),
    ours=("structloss_fast", "structloss_fast:cuda-strip"),
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
    register(Case(
        family="pairwise",
        name=_name,
        description=f"{_fn} (PML defaults), D=128, ~4 samples per class",
        providers={
            "structloss_fast": fwd_bwd(_slf(_fn, **_kw)),
            "structloss_fast:cuda-strip": fwd_bwd(_slf(_fn, backend="cuda", **_kw)),
            "pml": _pml(_pml_name),
        },
        sizes=[{"B": _default_b, "D": 128}],
        full_sizes=[{"B": 8192, "D": 128}],
        ours=("structloss_fast", "structloss_fast:cuda-strip"),
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

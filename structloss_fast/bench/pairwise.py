"""Benchmark cases of the pairwise family: structloss_fast against pytorch-metric-learning (PML),
the dense PyTorch reference and, for Circle loss, the GEMM floor."""
from __future__ import annotations

import torch

from . import Case, register

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
    def setup(size, device):
        x, y = make_batch(size, device)

        def run():
            loss = loss_fn(x, y)
            loss.backward()
            x.grad = None

        return run

    return setup


def _slf(name, backend="auto", **kw):
    def call(x, y):
        import structloss_fast as slf

        return getattr(slf, name)(x, y, backend=backend, **kw)

    return call


def _reference(name, **kw):
    def call(x, y):
        from structloss_fast.reference import pairwise as ref

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
    sizes=[{"B": 2048, "D": 128}, {"B": 8192, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}, {"B": 65536, "D": 128}],
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
    sizes=[{"B": 8192, "D": 128}],
    full_sizes=[{"B": 8192, "D": 128}, {"B": 65536, "D": 128}],
    skip=dense_skip,
))

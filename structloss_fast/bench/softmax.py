"""Benchmark cases of the row-softmax family: the Encouraging Loss beside the composite PyTorch
version (the reference, i.e. the spec's formula in torch ops) and F.cross_entropy; the fused
linear version beside F.linear_cross_entropy (chunked and dense) on the cross-entropy special
case and beside the composite linear + EL; CosFace beside pytorch-metric-learning.

The composite providers keep several (N, C) temporaries alive: their estimated footprint is
checked against SLF_BENCH_MAX_GB (default 6, for a shared 24 GB machine); a larger one is
skipped with the estimate as the reason. Set SLF_BENCH_MAX_GB=20 on a quiet machine to run the
full-size comparisons.
"""
from __future__ import annotations

import os

import torch

from . import Case, fwd_bwd_provider, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Peak (N, C)-sized buffers of each provider's forward+backward beyond the input, measured at
# small sizes (rounded up): the composite EL holds log-probabilities, probabilities, 1 - p, the
# bonus and their gradients; F.cross_entropy holds log-probabilities and the gradient.
NC_BUFFERS = {"composite_el": 8, "authors_el": 9, "torch_cross_entropy": 3, "composite_linear_el": 9,
              "torch_linear_ce_dense": 4, "pml": 8, "structloss_fast:unfused": 3}


def max_gb() -> float:
    return float(os.environ.get("SLF_BENCH_MAX_GB", "6"))


def logits_batch(size, device, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = size["N"], size["C"]
    dtype = DTYPES[size.get("dtype", "float32")]
    x = (torch.randn(N, C, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return x, y


def fwd_bwd_logits(loss_fn):
    return fwd_bwd_provider(logits_batch, loss_fn)


def _el(backend="auto", **kw):
    def call(x, y):
        import structloss_fast as slf

        return slf.encouraging_loss(x, y, backend=backend, **kw)

    return call


def _composite_el(x, y):
    from structloss_fast.softmax import reference as ref

    return ref.encouraging_loss(x, y)


def _authors_el(x, y):
    """The authors' published EncouragingLoss forward (LE = 0.75), in torch ops."""
    import torch.nn.functional as F

    lprobs = F.log_softmax(x, dim=-1)
    probs = torch.exp(lprobs)
    bonus = torch.log(torch.clamp(1 - probs, min=1e-5))
    after = (probs - 0.75) / (0.75 - 1) + torch.log(torch.tensor(0.25, dtype=x.dtype))
    bonus = torch.where(probs > 0.75, after, bonus)
    return F.nll_loss(lprobs - bonus, y)


def _cross_entropy(x, y):
    return torch.nn.functional.cross_entropy(x, y)


def linear_batch(size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, H, C = size["N"], size["H"], size["C"]
    dtype = DTYPES[size.get("dtype", "float32")]
    x = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(C, H, generator=g) / H ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.zeros(C).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return x, W, b, y


def fwd_bwd_linear(loss_fn):
    def setup(size, device):
        x, W, b, y = linear_batch(size, device)

        def run():
            loss = loss_fn(x, W, b, y)
            loss.backward()
            x.grad = W.grad = b.grad = None

        return run

    return setup


def _linear_el(**kw):
    def call(x, W, b, y):
        import structloss_fast as slf

        return slf.linear_encouraging_loss(x, W, y, b, **kw)

    return call


def _composite_linear_el(x, W, b, y):
    from structloss_fast.softmax import reference as ref

    return ref.linear_encouraging_loss(x, W, y, b)


def _torch_linear_ce(chunked: bool):
    def call(x, W, b, y):
        import torch.nn.functional as F

        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        return F.linear_cross_entropy(x, W, y, linear_bias=b, options=options)

    return call


def gemm_floor(size, device):
    """The three (N x H) (H x C) products of a fused linear forward+backward, alone (torch.mm on
    8192-row chunks): the time no fused linear loss can beat on this machine."""
    x, W, b, y = linear_batch(size, device)
    return three_gemms(x.detach(), W.detach())


def three_gemms(x, W):
    """A run of x W^T, then G W and G^T x with G that product, in chunks of 8M products."""
    N, C = x.shape[0], W.shape[0]
    rows = max(1, min(N, (1 << 23) // C))
    out = torch.empty(rows, C, device=x.device, dtype=x.dtype)
    gx = torch.empty_like(x)
    gw = torch.empty_like(W)

    def run():
        for r in range(0, N, rows):
            n = min(rows, N - r)
            torch.mm(x[r:r + n], W.t(), out=out[:n])
            torch.mm(out[:n], W, out=gx[r:r + n])
            gw.addmm_(out[:n].t(), x[r:r + n])

    return run


def embeddings_batch(size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, D, C = size["N"], size["D"], size["C"]
    x = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return x, y


def _cosface(fused: bool):
    def setup(size, device):
        import structloss_fast as slf

        x, y = embeddings_batch(size, device)
        head = slf.CosFaceLoss(size["C"], size["D"], fused=fused).to(device)

        def run():
            head(x, y).backward()
            x.grad = head.proxies.grad = None

        return run

    return setup


def _pml_cosface(size, device):
    from pytorch_metric_learning import losses

    x, y = embeddings_batch(size, device)
    head = losses.CosFaceLoss(num_classes=size["C"], embedding_size=size["D"]).to(device)

    def run():
        head(x, y).backward()
        x.grad = head.W.grad = None

    return run


def nc_skip(provider, size, device):
    if provider.startswith("structloss_fast:gpu") and device != "cuda":
        return "GPU-only provider"
    k = NC_BUFFERS.get(provider)
    if k is None or device != "cpu":
        return None
    bytes_per = torch.finfo(DTYPES[size.get("dtype", "float32")]).bits // 8
    est = k * size["N"] * size["C"] * bytes_per / 2**30
    if est > max_gb():
        return (f"needs about {est:.0f} GB ({k} N x C buffers) > SLF_BENCH_MAX_GB={max_gb():g}; "
                "rerun with a larger SLF_BENCH_MAX_GB on a quiet machine")
    return None


def full_only(*providers, default_sizes):
    """Providers measured at the --full sizes only (keeps the default run near 25 s)."""
    def skip(provider, size, device):
        if provider in providers and size in default_sizes:
            return "measured at the --full sizes only"
        return nc_skip(provider, size, device)

    return skip


EL_SIZES = [{"N": 1024, "C": 8192}]
LINEAR_SIZES = [{"N": 1024, "H": 256, "C": 8192}]
COSFACE_SIZES = [{"N": 512, "D": 128, "C": 8192}]

register(Case(
    family="softmax",
    name="encouraging_loss",
    description="Encouraging Loss (LE=0.75, rho=1), fp32 logits (N, C); composite = the spec's formula in torch ops",
    providers={
        "structloss_fast": fwd_bwd_logits(_el()),
        "structloss_fast:ce": fwd_bwd_logits(_el(bonus_weight=0.0)),
        "composite_el": fwd_bwd_logits(_composite_el),
        "authors_el": fwd_bwd_logits(_authors_el),
        "torch_cross_entropy": fwd_bwd_logits(_cross_entropy),
    },
    sizes=EL_SIZES,
    full_sizes=[{"N": 2048, "C": 32000}, {"N": 8192, "C": 32000}],
    ours=("structloss_fast", "structloss_fast:ce"),
    reference_points=("torch_cross_entropy",),
    skip=full_only("structloss_fast:ce", "authors_el", default_sizes=EL_SIZES),
))

register(Case(
    family="softmax",
    name="linear_encouraging_loss",
    description="fused linear + EL, fp32 (N, H) x (C, H) + bias; torch_linear_ce = F.linear_cross_entropy (CE only)",
    providers={
        "structloss_fast": fwd_bwd_linear(_linear_el()),
        "structloss_fast:ce": fwd_bwd_linear(_linear_el(bonus_weight=0.0)),
        "torch_linear_ce_chunked": fwd_bwd_linear(_torch_linear_ce(chunked=True)),
        "torch_linear_ce_dense": fwd_bwd_linear(_torch_linear_ce(chunked=False)),
        "composite_linear_el": fwd_bwd_linear(_composite_linear_el),
        "gemm_floor": gemm_floor,
    },
    sizes=LINEAR_SIZES,
    full_sizes=[{"N": 8192, "H": 1024, "C": 32000}],
    ours=("structloss_fast", "structloss_fast:ce"),
    reference_points=("gemm_floor",),
    skip=full_only("torch_linear_ce_chunked", "gemm_floor", default_sizes=LINEAR_SIZES),
))

register(Case(
    family="softmax",
    name="cosface",
    description="CosFace head (m=0.35, s=64), fp32 embeddings (N, D), C classes: fused (no N x C) and unfused kernels vs PML",
    providers={
        "structloss_fast": _cosface(fused=True),
        "structloss_fast:unfused": _cosface(fused=False),
        "pml": _pml_cosface,
    },
    sizes=COSFACE_SIZES,
    full_sizes=[{"N": 4096, "D": 512, "C": 100000}],
    ours=("structloss_fast", "structloss_fast:unfused"),
    skip=full_only("structloss_fast:unfused", default_sizes=COSFACE_SIZES),
))


# ---------------------------------------------------------------- the proxy losses ported from PML

PROXY_SIZES = [{"N": 1024, "D": 128, "C": 2000}]
PROXY_FULL = [{"N": 8192, "D": 128, "C": 10000}]
# SoftTriple has 10 centers per class: C = 1000 gives the same 10000 similarities per row.
SOFT_TRIPLE_SIZES = [{"N": 1024, "D": 128, "C": 200}]
SOFT_TRIPLE_FULL = [{"N": 8192, "D": 128, "C": 1000}]


def _proxy_step(make):
    """A Module's forward + backward on an embeddings batch, its proxies' gradients cleared."""
    def setup(size, device):
        x, y = embeddings_batch(size, device)
        mod = make(size).to(device)
        params = list(mod.parameters())

        def run():
            mod(x, y).backward()
            x.grad = None
            for p in params:
                p.grad = None

        return run

    return setup


def _ours(cls_name, **kw):
    def make(size):
        import structloss_fast as slf

        cls = getattr(slf, cls_name)
        if cls_name == "SubCenterArcFaceLoss":
            return cls(num_classes=size["C"], embedding_size=size["D"], **kw)
        return cls(size["C"], size["D"], **kw)

    return _proxy_step(make)


def _theirs(cls_name):
    def make(size):
        from pytorch_metric_learning import losses

        cls = getattr(losses, cls_name)
        if cls_name == "SubCenterArcFaceLoss":
            return cls(num_classes=size["C"], embedding_size=size["D"])
        return cls(size["C"], size["D"])

    return _proxy_step(make)


def proxy_gemm_floor(centers_per_class):
    """The three (N x D) (D x C K) products of a forward + backward alone (torch.mm in chunks of
    8M similarities): what no exact proxy loss can beat on this machine."""
    def setup(size, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(size["N"], size["D"], generator=g).to(device)
        return three_gemms(x, torch.randn(size["C"] * centers_per_class, size["D"], generator=g).to(device))

    return setup


for _name, _cls, _k, _sizes, _full in [
    ("normalized_softmax", "NormalizedSoftmaxLoss", 1, PROXY_SIZES, PROXY_FULL),
    ("proxy_nca", "ProxyNCALoss", 1, PROXY_SIZES, PROXY_FULL),
    ("proxy_anchor", "ProxyAnchorLoss", 1, PROXY_SIZES, PROXY_FULL),
    ("subcenter_arcface", "SubCenterArcFaceLoss", 3, PROXY_SIZES, PROXY_FULL),
    ("soft_triple", "SoftTripleLoss", 10, SOFT_TRIPLE_SIZES, SOFT_TRIPLE_FULL),
]:
    register(Case(
        family="softmax",
        name=_name,
        description=f"{_cls} (PML's defaults, {_k} center(s) per class), fp32 embeddings (N, D), C classes, vs PML",
        providers={
            "structloss_fast": _ours(_cls),
            "pml": _theirs(_cls),
            "gemm_floor": proxy_gemm_floor(_k),
        },
        sizes=_sizes,
        full_sizes=_full,
        reference_points=("gemm_floor",),
        skip=full_only("gemm_floor", default_sizes=_sizes),
    ))

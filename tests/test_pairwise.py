"""Circle loss and the unified loss on the fused pairwise engine: every backend against the
reference (the definition) and against pytorch-metric-learning, gradients, custom-op
registration, low precision, edge cases and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fast_backends, triton_device
from helpers import assert_close_to_truth, assert_tight, max_abs, numerical_grad

import structloss_fast as slf
from structloss_fast import _ext
from structloss_fast.ops import pairwise as ops
from structloss_fast.reference import pairwise as ref

BACKENDS = fast_backends("pairwise_loss")
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]
LOSSES = {
    "circle": (slf.circle_loss, ref.circle_loss, dict(m=0.4, gamma=80.0)),
    "unified": (slf.unified_loss, ref.unified_loss, dict(m=0.35, gamma=64.0)),
}


def labels_pattern(kind: str, B: int, gen=None) -> torch.Tensor:
    if kind == "random":
        return torch.randint(0, max(B // 3, 1), (B,), generator=gen)
    if kind == "singletons":  # every label unique except one pair
        y = torch.arange(B)
        if B >= 2:
            y[-1] = y[0]
        return y
    if kind == "one_class":
        return torch.zeros(B, dtype=torch.long)
    if kind == "all_distinct":
        return torch.arange(B) * 7 - 3
    if kind == "two_classes":
        return torch.arange(B) % 2
    raise ValueError(kind)


def run_loss(fn, x, y, backend, device, ref_x=None, ref_y=None, **kw):
    """Loss and gradients (embeddings, refs) of a backend on `device`."""
    xd = x.detach().to(device).requires_grad_(True)
    rd = None if ref_x is None else ref_x.detach().to(device).requires_grad_(True)
    ryd = None if ref_y is None else ref_y.to(device)
    loss = fn(xd, y.to(device), ref_embeddings=rd, ref_labels=ryd, backend=backend, **kw)
    weights = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    target = (loss * weights.to(device=device, dtype=loss.dtype)).sum()
    grads = torch.autograd.grad(target, [xd] + ([rd] if rd is not None else []), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [xd] + ([rd] if rd is not None else []))]
    return loss.detach().cpu(), [g.cpu() for g in grads]


def reference_loss(rfn, x, y, ref_x=None, ref_y=None, **kw):
    return run_loss(lambda *a, backend=None, **k: rfn(*a, **k), x, y, None, torch.device("cpu"), ref_x, ref_y, **kw)


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pattern", ["random", "singletons", "one_class", "all_distinct", "two_classes"])
def test_float64_matches_reference(backend, device, loss_name, reduction, pattern):
    fn, rfn, params = LOSSES[loss_name]
    B, D = (23, 9) if backend == "triton" else (57, 13)
    x = torch.randn(B, D, dtype=torch.float64)
    y = labels_pattern(pattern, B)
    out, grads = run_loss(fn, x, y, backend, device, reduction=reduction, **params)
    exp, exp_grads = reference_loss(rfn, x, y, reduction=reduction, **params)
    assert out.shape == exp.shape
    assert_tight(out, exp, what="loss")
    for g, e in zip(grads, exp_grads):
        assert_tight(g, e, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_references_of_other_length(backend, device, loss_name, reduction, M):
    fn, rfn, params = LOSSES[loss_name]
    B, D = 17, 8
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 4, (B,))
    rx = torch.randn(M, D, dtype=torch.float64)
    ry = torch.randint(0, 4, (M,))
    out, grads = run_loss(fn, x, y, backend, device, rx, ry, reduction=reduction, **params)
    exp, exp_grads = reference_loss(rfn, x, y, rx, ry, reduction=reduction, **params)
    assert_tight(out, exp, what="loss")
    assert len(grads) == 2
    for g, e in zip(grads, exp_grads):
        assert_tight(g, e, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gamma", [1.0, 80.0, 256.0, 1024.0])
@pytest.mark.parametrize("m", [0.0, 0.25, 0.4, 0.9])
def test_float32_within_2x_torch_error(backend, device, gamma, m):
    """fp32 against the fp64 truth: no worse than twice PyTorch's own fp32 error (plus a floor)."""
    B, D = (29, 16) if backend == "triton" else (96, 32)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 12, (B,))
    truth, truth_g = reference_loss(ref.circle_loss, x, y, m=m, gamma=gamma)
    torch32, torch32_g = reference_loss(ref.circle_loss, x.float(), y, m=m, gamma=gamma)
    out, g = run_loss(slf.circle_loss, x.float(), y, backend, device, m=m, gamma=gamma)
    scale = max(truth.abs().item(), 1.0)
    assert_close_to_truth(out, truth, torch32, floor=1e-6 * scale, what="loss")
    gscale = truth_g[0].abs().max().item()
    assert_close_to_truth(g[0], truth_g[0], torch32_g[0], floor=1e-6 * gscale, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_low_precision_within_2x_torch_error(backend, device, dtype, loss_name):
    fn, rfn, params = LOSSES[loss_name]
    B, D = (32, 16) if backend == "triton" else (64, 32)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 10, (B,))
    truth, truth_g = reference_loss(rfn, x, y, **params)
    low, low_g = reference_loss(rfn, x.to(dtype), y, **params)
    out, g = run_loss(fn, x.to(dtype), y, backend, device, **params)
    assert out.dtype == dtype and g[0].dtype == dtype
    assert_close_to_truth(out, truth, low, floor=1e-3, what="loss")
    assert_close_to_truth(g[0], truth_g[0], low_g[0], floor=1e-4, what="grad")


# ---------------------------------------------------------------- parity with PML


pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("pattern", ["random", "singletons", "one_class", "all_distinct", "two_classes"])
@pytest.mark.parametrize("m,gamma", [(0.4, 80.0), (0.25, 256.0), (0.25, 1024.0)])
@pytest.mark.parametrize("B", [1, 2, 3, 40])
def test_matches_pml_circle_loss(backend, device, pattern, m, gamma, B):
    x = torch.randn(B, 12, dtype=torch.float64)
    y = labels_pattern(pattern, B)
    xp = x.clone().requires_grad_(True)
    expected = pml_losses.CircleLoss(m=m, gamma=gamma)(xp, y)
    expected.backward()
    out, grads = run_loss(lambda *a, **k: slf.CircleLoss(m=m, gamma=gamma, backend=k.pop("backend"))(a[0], a[1]),
                          x, y, backend, device)
    # run_loss weights a scalar loss by a random factor: undo it for the comparison.
    w = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert_tight(out, expected.detach(), what="loss")
    assert_tight(grads[0] / w, xp.grad, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_matches_pml_float32_and_refs(backend, device):
    B, M, D = 48, 30, 24
    x = torch.randn(B, D)
    y = torch.randint(0, 6, (B,))
    rx = torch.randn(M, D)
    ry = torch.randint(0, 6, (M,))
    xp, rp = x.clone().requires_grad_(True), rx.clone().requires_grad_(True)
    expected = pml_losses.CircleLoss()(xp, y, ref_emb=rp, ref_labels=ry)
    expected.backward()
    xd = x.to(device).requires_grad_(True)
    rd = rx.to(device).requires_grad_(True)
    out = slf.CircleLoss(backend=backend)(xd, y.to(device), ref_emb=rd, ref_labels=ry.to(device))
    out.backward()
    tol = 2e-5 * max(1.0, expected.abs().item())
    assert abs(out.item() - expected.item()) <= tol
    assert max_abs(xd.grad, xp.grad) <= 2e-5 * xp.grad.abs().max().item() + 1e-7
    assert max_abs(rd.grad, rp.grad) <= 2e-5 * rp.grad.abs().max().item() + 1e-7


# ---------------------------------------------------------------- gradients


def _frozen_alpha_circle(x0, y, m, gamma, reduction, r0=None, ry=None):
    """Circle loss as a function of the embeddings with the alphas frozen at (x0, r0): its
    derivative at x0 is, by definition, the detached-alpha gradient of Circle loss."""
    s0 = ref.cosine_similarity(x0, x0 if r0 is None else r0)
    alpha_p, alpha_n = torch.relu(1 + m - s0), torch.relu(s0 + m)

    def f(x, r=None):
        out = ref._twoset_loss(
            lambda s: -gamma * alpha_p * (s - (1 - m)),
            lambda s: gamma * alpha_n * (s - m),
            x, y, r, ry, reduction,
        )
        return out

    return f


@pytest.mark.parametrize("backend,device", [("reference", torch.device("cpu"))] + BACKENDS,
                         ids=["reference-cpu"] + BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_refs", [False, True])
def test_gradcheck_circle_float64(backend, device, reduction, with_refs):
    """Finite differences (float64) of Circle loss with frozen alphas against each backend's
    analytic gradient, for embeddings and references."""
    m, gamma = 0.3, 7.0
    B, D, M = 6, 4, 5
    x0 = torch.randn(B, D, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    r0 = torch.randn(M, D, dtype=torch.float64) if with_refs else None
    ry = torch.tensor([0, 1, 1, 2, 3]) if with_refs else None
    v = torch.randn(B if reduction == "none" else (), dtype=torch.float64)
    f = _frozen_alpha_circle(x0, y, m, gamma, reduction, r0, ry)

    xd = x0.clone().to(device).requires_grad_(True)
    rd = r0.clone().to(device).requires_grad_(True) if with_refs else None
    loss = slf.circle_loss(xd, y.to(device), m=m, gamma=gamma, reduction=reduction, backend=backend,
                           ref_embeddings=rd, ref_labels=None if ry is None else ry.to(device))
    grads = torch.autograd.grad((loss * v.to(device)).sum(), [xd] + ([rd] if with_refs else []))
    num_x = numerical_grad(lambda x: (f(x, r0) * v).sum(), x0)
    assert_tight(grads[0].cpu(), num_x, rtol=1e-6, atol=1e-8, what="d/dx")
    if with_refs:
        num_r = numerical_grad(lambda r: (f(x0, r) * v).sum(), r0)
        assert_tight(grads[1].cpu(), num_r, rtol=1e-6, atol=1e-8, what="d/dref")


@pytest.mark.parametrize("backend,device", [("reference", torch.device("cpu"))] + BACKENDS,
                         ids=["reference-cpu"] + BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_unified_float64(backend, device, reduction):
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(4, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 0], device=device)
    ry = torch.tensor([0, 1, 2, 2], device=device)
    fn = lambda x: slf.unified_loss(x, y, gamma=5.0, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    fn2 = lambda x, r: slf.unified_loss(x, y, gamma=5.0, ref_embeddings=r, ref_labels=ry,  # noqa: E731
                                        reduction=reduction, backend=backend)
    assert torch.autograd.gradcheck(fn2, (x, r))


# ---------------------------------------------------------------- custom-op registration


def _op_args(device, dtype=torch.float64, exclude_self=True, reduction=1, compute_grad=True, B=9, M=7, D=5):
    x = F.normalize(torch.randn(B, D, dtype=dtype), dim=1).to(device).requires_grad_(True)
    y = torch.randint(0, 3, (B,)).to(device)
    if exclude_self:
        r, ry = x, y
    else:
        r = F.normalize(torch.randn(M, D, dtype=dtype), dim=1).to(device).requires_grad_(True)
        ry = torch.randint(0, 3, (M,)).to(device)
    return (x, y, r, ry, exclude_self, ops.LOSS_IDS["circle"], [0.4, 80.0], reduction, compute_grad)


OPCHECK_CASES = [(True, 1, True), (False, 1, True), (True, 0, False), (False, 2, False), (False, 0, False)]


@pytest.mark.skipif(not _ext.has_kernel("pairwise_loss", "CPU"), reason="extension not built")
@pytest.mark.parametrize("exclude_self,reduction,compute_grad", OPCHECK_CASES)
def test_opcheck_compiled_forward(exclude_self, reduction, compute_grad):
    args = _op_args("cpu", exclude_self=exclude_self, reduction=reduction, compute_grad=compute_grad)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss.default, args)


@pytest.mark.skipif(not _ext.has_kernel("pairwise_loss", "CPU"), reason="extension not built")
@pytest.mark.parametrize("exclude_self", [True, False])
def test_opcheck_compiled_backward(exclude_self):
    x, y, r, ry, ex, loss, params, _, _ = _op_args("cpu", exclude_self=exclude_self)
    stats = torch.ops.structloss_fast.pairwise_loss(x, y, r, ry, ex, loss, params, 0, False)[1].detach()
    w = torch.randn(x.shape[0], dtype=x.dtype)
    args = (x.detach(), y, r.detach(), ry, stats, w, ex, loss, params)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_backward.default, args)


@pytest.mark.parametrize("exclude_self,reduction", [(True, 1), (False, 0), (False, 2)])
def test_opcheck_triton(exclude_self, reduction):
    if not _ext.backend_status("triton", triton_device(), "pairwise_loss")[0]:
        pytest.skip("triton unavailable")
    args = _op_args(triton_device(), exclude_self=exclude_self, reduction=reduction, compute_grad=False, B=5, M=4, D=3)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_triton.default, args)
    x, y, r, ry, ex, loss, params, _, _ = args
    stats = torch.ops.structloss_fast.pairwise_loss_triton(x, y, r, ry, ex, loss, params, 0, False)[1].detach()
    w = torch.randn(x.shape[0], dtype=stats.dtype, device=x.device)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_backward_triton.default,
                          (x.detach(), y, r.detach(), ry, stats, w, ex, loss, params))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_torch_compile_fullgraph(backend, device):
    def step(x, y):
        return slf.circle_loss(x * 2.0, y, backend=backend) + slf.unified_loss(x, y, reduction="sum", backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    x = torch.randn(16, 8, device=device, requires_grad=True)
    y = torch.randint(0, 4, (16,), device=device)
    out = compiled(x, y)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    expected = step(x, y)
    expected.backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g, x.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", [("reference", torch.device("cpu"))] + BACKENDS,
                         ids=["reference-cpu"] + BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, device, reduction):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss = slf.circle_loss(x, y, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
        loss.backward()
        assert x.grad is not None and x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("B", [1, 2])
def test_no_pairs_gives_zero_with_gradient(backend, device, B):
    """B = 1, or B = 2 with different labels: no row has both a positive and a negative."""
    x = torch.randn(B, 8, device=device, requires_grad=True)
    y = torch.arange(B, device=device)
    loss = slf.circle_loss(x, y, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_and_label_dtypes(backend, device):
    base = torch.randn(30, 20, dtype=torch.float64)
    x = base[::2, 1::2]  # (15, 10), non-contiguous
    assert not x.is_contiguous()
    y64 = torch.randint(0, 4, (30,))[::2]
    expected, eg = reference_loss(ref.circle_loss, x, y64)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        out, g = run_loss(slf.circle_loss, x, y64.to(dtype), backend, device)
        assert_tight(out, expected, what=str(dtype))
        assert_tight(g[0], eg[0], rtol=1e-9, what=str(dtype))


@pytest.mark.skipif(not _ext.has_kernel("pairwise_loss", "CPU"), reason="extension not built")
def test_labels_beyond_int32_are_not_aliased():
    """Labels that differ only above 32 bits must stay different classes."""
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2**33, 2**33 + 1, 2**40, 2**40], dtype=torch.int64)
    out, g = run_loss(slf.circle_loss, x, y, "cpu", torch.device("cpu"))
    exp, eg = reference_loss(ref.circle_loss, x, y)
    assert_tight(out, exp)
    assert_tight(g[0], eg[0], rtol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_non_finite_embeddings_give_non_finite_loss(backend, device, bad, reduction):
    x = torch.randn(12, 6)
    x[3, 2] = bad
    y = torch.randint(0, 3, (12,))
    loss = slf.circle_loss(x.to(device), y.to(device), reduction=reduction, backend=backend)
    assert not torch.isfinite(loss).item()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gamma", [1e4, 1e6])
def test_huge_scale_stays_finite_and_exact(backend, device, gamma):
    x = torch.randn(24, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    out, g = run_loss(slf.circle_loss, x, y, backend, device, gamma=gamma)
    exp, eg = reference_loss(ref.circle_loss, x, y, gamma=gamma)
    assert torch.isfinite(out).all() and torch.isfinite(g[0]).all()
    assert_tight(out, exp, rtol=1e-9)
    assert_tight(g[0], eg[0], rtol=1e-8)


@pytest.mark.skipif(not _ext.has_kernel("pairwise_loss", "CPU"), reason="extension not built")
def test_cpu_is_deterministic_and_strip_independent():
    """Same input, same bits; and a batch larger than one strip matches the reference."""
    B, D = 2100, 16  # > one strip of the CPU engine when M = 2100 (strip budget / M rows)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, 500, (B,))
    l1 = slf.circle_loss(x, y, backend="cpu")
    g1, = torch.autograd.grad(l1, x)
    l2 = slf.circle_loss(x, y, backend="cpu")
    g2, = torch.autograd.grad(l2, x)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    xd = x.detach().double().requires_grad_(True)
    exp = ref.circle_loss(xd, y)
    eg, = torch.autograd.grad(exp, xd)
    assert abs(l1.item() - exp.item()) <= 1e-5 * exp.item()
    assert max_abs(g1, eg) <= 1e-5 * eg.abs().max().item()


def test_auto_uses_the_compiled_kernel_on_cpu(monkeypatch):
    """backend="auto" must not fall back to the reference when the CPU kernel exists."""
    if not _ext.has_kernel("pairwise_loss", "CPU"):
        pytest.skip("extension not built")
    assert _ext.resolve_backend("auto", torch.device("cpu"), "pairwise_loss") == "cpu"

    def boom(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(ref, "circle_loss", boom)
    monkeypatch.setattr(slf.pairwise._ref, "circle_loss", boom)
    x = torch.randn(10, 4)
    slf.circle_loss(x, torch.randint(0, 3, (10,)))


def test_module_matches_function_and_repr():
    x = torch.randn(20, 8)
    y = torch.randint(0, 5, (20,))
    mod = slf.CircleLoss(m=0.25, gamma=128, reduction="sum")
    assert torch.allclose(mod(x, y), slf.circle_loss(x, y, m=0.25, gamma=128, reduction="sum"))
    assert "gamma=128" in repr(mod)
    with pytest.raises(NotImplementedError, match="miners"):
        mod(x, y, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert torch.allclose(slf.UnifiedLoss()(x, y), slf.unified_loss(x, y))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(4, 3, 2)), ValueError, "embeddings must be 2-D"),
        (dict(y=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must be 1-D"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have one entry per row of embeddings"),
        (dict(y=torch.zeros(4)), TypeError, "labels must hold integer class labels"),
        (dict(x=torch.zeros(4, 3, dtype=torch.long)), TypeError, "embeddings must be float16"),
        (dict(y=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "one device"),
        (dict(gamma=-1.0), ValueError, "gamma must be > 0"),
        (dict(gamma=0.0), ValueError, "gamma must be > 0"),
        (dict(gamma=float("inf")), ValueError, "gamma must be finite"),
        (dict(m=1.0), ValueError, "m must be < 1"),
        (dict(m=-0.1), ValueError, "m must be >= 0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(rx=torch.randn(5, 3)), ValueError, "ref_embeddings and ref_labels must be given together"),
        (dict(rx=torch.randn(5, 2), ry=torch.zeros(5, dtype=torch.long)), ValueError, "embedding size"),
        (dict(rx=torch.randn(5, 3), ry=torch.zeros(4, dtype=torch.long)), ValueError, "ref_labels must have one entry"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, match):
    x = kwargs.pop("x", torch.randn(4, 3))
    y = kwargs.pop("y", torch.zeros(4, dtype=torch.long))
    rx = kwargs.pop("rx", None)
    ry = kwargs.pop("ry", None)
    with pytest.raises(exc, match=match):
        slf.circle_loss(x, y, ref_embeddings=rx, ref_labels=ry, **kwargs)


def test_unavailable_backend_raises():
    x = torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(slf.BackendUnavailable, match="cuda"):
        slf.circle_loss(x, y, backend="cuda")


def test_triton_rejects_too_wide_embeddings():
    if not _ext.backend_status("triton", triton_device(), "pairwise_loss")[0]:
        pytest.skip("triton unavailable")
    from structloss_fast.triton import pairwise as tk

    x = torch.randn(2, tk.MAX_D + 1, device=triton_device())
    with pytest.raises(slf.BackendUnavailable, match="D <="):
        slf.circle_loss(x, torch.zeros(2, dtype=torch.long, device=triton_device()), backend="triton")


# ---------------------------------------------------------------- property-based


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def pairwise_problem(draw, max_b=40):
    B = draw(st.integers(1, max_b))
    D = draw(st.integers(1, 12))
    n_classes = draw(st.integers(1, B))
    labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=B, max_size=B))
    with_refs = draw(st.booleans())
    M = draw(st.integers(0, 30)) if with_refs else 0
    ref_labels = draw(st.lists(st.integers(0, n_classes), min_size=M, max_size=M))
    seed = draw(st.integers(0, 2**31 - 1))
    loss = draw(st.sampled_from(list(LOSSES)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    m = draw(st.floats(0.0, 0.95))
    gamma = draw(st.floats(0.5, 512.0))
    return B, D, labels, with_refs, M, ref_labels, seed, loss, reduction, m, gamma


def _check_problem(problem, backend, device):
    B, D, labels, with_refs, M, ref_labels, seed, loss, reduction, m, gamma = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, dtype=torch.float64, generator=g)
    y = torch.tensor(labels)
    rx = torch.randn(M, D, dtype=torch.float64, generator=g) if with_refs else None
    ry = torch.tensor(ref_labels, dtype=torch.long) if with_refs else None
    fn, rfn, _ = LOSSES[loss]
    out, grads = run_loss(fn, x, y, backend, device, rx, ry, reduction=reduction, m=m, gamma=gamma)
    exp, exp_grads = reference_loss(rfn, x, y, rx, ry, reduction=reduction, m=m, gamma=gamma)
    assert_tight(out, exp, rtol=1e-9, atol=1e-10, what="loss")
    for a, b in zip(grads, exp_grads):
        assert_tight(a, b, rtol=1e-8, atol=1e-10, what="grad")


@pytest.mark.skipif(not _ext.has_kernel("pairwise_loss", "CPU"), reason="extension not built")
@settings(max_examples=150, deadline=None)
@given(pairwise_problem())
def test_property_cpu_matches_reference(problem):
    _check_problem(problem, "cpu", torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(pairwise_problem(max_b=20))
def test_property_triton_matches_reference(problem):
    if not _ext.backend_status("triton", triton_device(), "pairwise_loss")[0]:
        pytest.skip("triton unavailable")
    _check_problem(problem, "triton", triton_device())

"""The proxy losses ported from pytorch-metric-learning (NormalizedSoftmax, ProxyNCA,
SubCenterArcFace, SoftTriple, ProxyAnchor): every fast path against the reference and PML in loss
and gradients (embeddings and proxies), gradcheck, opcheck of the new ops, precision, chunking,
edge cases and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _registry
from structloss_fast._ids import SoftmaxPool, SoftmaxTransform
from structloss_fast.softmax import _ops as ops
from structloss_fast.softmax import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, max_abs

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


class Proxy:
    """A loss: our functional, PML's class and how its parameter maps to our proxies."""

    def __init__(self, name, fn, pml, attr, transposed, groups, params, other, pml_params=None):
        self.name, self.fn, self.pml, self.attr, self.transposed = name, fn, pml, attr, transposed
        self.groups, self.params, self.other = groups, params, other
        self.pml_params = pml_params or (lambda p: p)

    def __repr__(self):
        return self.name

    def proxies_of(self, pml):
        w = getattr(pml, self.attr).detach()
        return (w.T if self.transposed else w).clone()


LOSSES = [
    Proxy("normalized_softmax", slf.normalized_softmax_loss, pml_losses.NormalizedSoftmaxLoss, "W", True, 1,
          dict(temperature=0.05), dict(temperature=0.3)),
    Proxy("proxy_nca", slf.proxy_nca_loss, pml_losses.ProxyNCALoss, "proxies", False, 1, dict(softmax_scale=1.0),
          dict(softmax_scale=4.0)),
    Proxy("subcenter_arcface", slf.subcenter_arcface_loss, pml_losses.SubCenterArcFaceLoss, "W", True, 3,
          dict(margin=math.radians(28.6), scale=64.0, sub_centers=3), dict(margin=0.3, scale=16.0, sub_centers=2),
          pml_params=lambda p: dict(p, margin=math.degrees(p["margin"]))),
    Proxy("soft_triple", slf.soft_triple_loss, pml_losses.SoftTripleLoss, "fc", True, 10,
          dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01),
          dict(centers_per_class=4, la=8.0, gamma=0.5, margin=0.2)),
    Proxy("proxy_anchor", slf.proxy_anchor_loss, pml_losses.ProxyAnchorLoss, "proxies", False, 1,
          dict(margin=0.1, alpha=32.0), dict(margin=0.3, alpha=8.0)),
]
BY_NAME = {lo.name: lo for lo in LOSSES}


def groups(loss, params):
    return params.get("sub_centers", params.get("centers_per_class", 1))


def make_pml(loss, params, C, D):
    p = loss.pml_params(params)
    if loss.name == "subcenter_arcface":
        return pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, **p).double()
    return loss.pml(C, D, **p).double()


def problem(N, C, D, groups=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    P = torch.randn(C * groups, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, P, y


def run(fn, x, P, y, weights_seed=3, **kw):
    xd, Pd = x.clone().requires_grad_(True), P.clone().requires_grad_(True)
    out = fn(xd, Pd, y, **kw)
    v = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(weights_seed))
    gx, gP = torch.autograd.grad((out * v.to(out.dtype)).sum(), [xd, Pd])
    return out.detach(), gx, gP


def reference_fn(loss):
    return lambda *a, backend=None, fused=None, **k: loss.fn(*a, backend="reference", **k)


# Every way a loss runs here: the CPU kernels fused (chunked) and unfused (dense cosines, then the
# row kernel; the heads only), and the reference.
PATHS = [("cpu", True), ("cpu", False), ("reference", True)]


def paths(loss):
    return [p for p in PATHS if not (loss.name == "proxy_anchor" and not p[1])]


def combos():
    return [pytest.param(lo, b, f, id=f"{lo.name}-{b}-{'fused' if f else 'unfused'}") for lo in LOSSES
            for b, f in paths(lo)]


def call(loss, backend, fused, x, P, y, params, **kw):
    if loss.name != "proxy_anchor":
        kw["fused"] = fused
    return loss.fn(x, P, y, backend=backend, **params, **kw)


# ---------------------------------------------------------------- parity with PML


@pytest.mark.parametrize("loss,backend,fused", combos())
@pytest.mark.parametrize("setting", ["default", "other"])
@pytest.mark.parametrize("N,C", [(1, 3), (2, 1), (24, 7), (40, 60)])
def test_matches_pml_float64(loss, backend, fused, setting, N, C):
    """Loss and gradients of the embeddings and proxies equal PML's, its parameter mapped to our
    (C K, D) proxies."""
    params = loss.params if setting == "default" else loss.other
    D = 6
    torch.manual_seed(N * 100 + C)
    pml = make_pml(loss, params, C, D)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N,))
    expected = pml(x, y)
    ex, ew = torch.autograd.grad(expected, [x, getattr(pml, loss.attr)])
    P = loss.proxies_of(pml).requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    out = call(loss, backend, fused, xd, P, y, params)
    gx, gP = torch.autograd.grad(out, [xd, P])
    assert_tight(out.detach(), expected.detach(), what="loss")
    assert_tight(gx, ex, rtol=1e-9, atol=1e-12, what="d/dx")
    assert_tight(gP, ew.T if loss.transposed else ew, rtol=1e-9, atol=1e-12, what="d/dproxies")


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_module_is_a_drop_in_for_pml(loss):
    """The Module takes PML's constructor keywords, holds `proxies` as a Parameter (PML's layout
    transposed where PML keeps (D, C K)) and gives PML's loss once its proxies are PML's."""
    C, D = 5, 8
    params = loss.other
    pml = make_pml(loss, params, C, D).float()
    mod = {
        "normalized_softmax": lambda: slf.NormalizedSoftmaxLoss(C, D, **params),
        "proxy_nca": lambda: slf.ProxyNCALoss(C, D, **params),
        "subcenter_arcface": lambda: slf.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, **params),
        "soft_triple": lambda: slf.SoftTripleLoss(C, D, **params),
        "proxy_anchor": lambda: slf.ProxyAnchorLoss(C, D, **params),
    }[loss.name]()
    assert isinstance(mod.proxies, torch.nn.Parameter)
    assert mod.proxies.shape == (C * groups(loss, params), D)
    with torch.no_grad():
        mod.proxies.copy_(loss.proxies_of(pml))
    x, y = torch.randn(30, D), torch.randint(0, C, (30,))
    assert torch.allclose(mod(x, y), pml(x, y), rtol=1e-5, atol=1e-6)
    out = mod(x, y)
    out.backward()
    assert mod.proxies.grad is not None and torch.isfinite(mod.proxies.grad).all()


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_proxies_are_initialized_as_pml(loss):
    """Same distribution as PML's initialization (compared by their spread over many entries)."""
    C, D = 400, 64
    params = loss.params
    torch.manual_seed(0)
    pml = make_pml(loss, params, C, D)
    ours = {
        "normalized_softmax": lambda: slf.NormalizedSoftmaxLoss(C, D),
        "proxy_nca": lambda: slf.ProxyNCALoss(C, D),
        "subcenter_arcface": lambda: slf.SubCenterArcFaceLoss(num_classes=C, embedding_size=D),
        "soft_triple": lambda: slf.SoftTripleLoss(C, D),
        "proxy_anchor": lambda: slf.ProxyAnchorLoss(C, D),
    }[loss.name]()
    theirs = getattr(pml, loss.attr).detach().float()
    assert ours.proxies.numel() == theirs.numel()
    for stat in (lambda t: t.std(), lambda t: t.abs().max(), lambda t: t.mean().abs() + t.std()):
        a, b = stat(ours.proxies.detach()).item(), stat(theirs).item()
        assert abs(a - b) <= 0.1 * b, f"{loss.name}: {a} vs PML's {b}"


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("loss,backend,fused", [p for p in combos() if p.values[1] != "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(loss, backend, fused, reduction):
    x, P, y = problem(29, 11, 5, groups(loss, loss.other))
    y[3] = y[4] = 2
    out, gx, gP = run(lambda *a, **k: call(loss, backend, fused, *a, loss.other, **k), x, P, y, reduction=reduction)
    exp, ex, eP = run(reference_fn(loss), x, P, y, reduction=reduction, **loss.other)
    assert out.shape == exp.shape
    assert_tight(out, exp, what="loss")
    assert_tight(gx, ex, rtol=1e-9, what="d/dx")
    assert_tight(gP, eP, rtol=1e-9, what="d/dproxies")


@pytest.mark.parametrize("loss,backend,fused", [p for p in combos() if p.values[1] != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_2x_torch_error(loss, backend, fused, dtype):
    params = loss.params
    x, P, y = problem(48, 9, 16, groups(loss, params))
    truth, tx, tP = run(reference_fn(loss), x, P, y, **params)
    low, lx, lP = run(reference_fn(loss), x.to(dtype), P.to(dtype), y, **params)
    out, gx, gP = run(lambda *a, **k: call(loss, backend, fused, *a, params, **k), x.to(dtype), P.to(dtype), y)
    assert out.dtype == dtype and gx.dtype == dtype and gP.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_close_to_truth(out, truth, low, floor=floor * max(truth.abs().item(), 1.0), what="loss")
    assert_close_to_truth(gx, tx, lx, floor=floor * tx.abs().max().item(), what="d/dx")
    assert_close_to_truth(gP, tP, lP, floor=floor * tP.abs().max().item(), what="d/dproxies")


@pytest.mark.parametrize("loss,backend,fused", [p for p in combos() if p.values[1] != "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(loss, backend, fused, reduction):
    params = dict(loss.other)
    if loss.name == "subcenter_arcface":
        params["scale"] = 4.0
    x, P, y = problem(6, 3, 4, groups(loss, params), seed=1)
    x.requires_grad_(True)
    P.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, P: call(loss, backend, fused, x, P, y, params, reduction=reduction), (x, P))


@pytest.mark.parametrize("loss", [lo for lo in LOSSES if lo.groups > 1] + [BY_NAME["proxy_anchor"]], ids=str)
def test_many_chunks_match_reference(loss):
    """More rows than one chunk of the pooled / ProxyAnchor kernels holds (their chunks are about
    8M and 4M similarities): the per-class statistics carry across chunks."""
    params = dict(loss.params)
    C = 3000 if loss.name == "proxy_anchor" else 900
    x, P, y = problem(1500, C, 3, groups(loss, params), dtype=torch.float32)
    out, gx, gP = run(lambda *a, **k: call(loss, "cpu", True, *a, params, **k), x, P, y)
    exp, ex, eP = run(reference_fn(loss), x.double(), P.double(), y, **params)
    assert abs(out.item() - exp.item()) <= 1e-5 * max(1.0, abs(exp.item()))
    assert max_abs(gx, ex) <= 1e-4 * ex.abs().max().item()
    assert max_abs(gP, eP) <= 1e-4 * eP.abs().max().item()
    out2, gx2, gP2 = run(lambda *a, **k: call(loss, "cpu", True, *a, params, **k), x, P, y)
    assert torch.equal(out, out2) and torch.equal(gx, gx2) and torch.equal(gP, gP2), "not deterministic"


# ---------------------------------------------------------------- custom ops


def _normed(N, C, D, dtype=torch.float64):
    x, P, y = problem(N, C, D, dtype=dtype)
    return F.normalize(x, dim=1).requires_grad_(True), F.normalize(P, dim=1).requires_grad_(True), y


@pytest.mark.parametrize("pool,transform,param", [(SoftmaxPool.MAX, SoftmaxTransform.ARC_FACE, 0.0),
                                                  (SoftmaxPool.SOFT_AVG, SoftmaxTransform.COS_FACE, 10.0)])
@pytest.mark.parametrize("grad_mask", [[False, False], [True, True], [True, False]])
def test_opcheck_pooled(pool, transform, param, grad_mask):
    K = 3
    x, W, y = _normed(7, 4 * K, 5)
    y = y % 4
    params = ops.make_params(0.75, 0.0, 0.0, 1e-5, 16.0, 0.3)
    args = (x, W, y, None, -100, int(transform), params, int(pool), K, param, grad_mask)
    torch.library.opcheck(torch.ops.structloss_fast.pooled_linear_softmax_loss.default, args)
    stats = torch.ops.structloss_fast.pooled_linear_softmax_loss(*args)[0].detach()
    w = torch.randn(7, dtype=torch.float64)
    bargs = (x.detach(), W.detach(), y, torch.rand(4, dtype=torch.float64), stats, w, -100, int(transform), params,
             int(pool), K, param, [True, True])
    torch.library.opcheck(torch.ops.structloss_fast.pooled_linear_softmax_loss_backward.default, bargs)


def test_opcheck_proxy_anchor():
    x, P, y = _normed(9, 5, 4)
    args = (x, P, y, [32.0, 0.1])
    torch.library.opcheck(torch.ops.structloss_fast.proxy_anchor_loss.default, args)
    stats = torch.ops.structloss_fast.proxy_anchor_loss(*args).detach()
    w = torch.randn(5, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.structloss_fast.proxy_anchor_loss_backward.default,
                          (x.detach(), P.detach(), y, stats, w, [32.0, 0.1], [True, True]))


def test_torch_compile_fullgraph():
    def step(x, P, P3, P10, y):
        out = slf.proxy_anchor_loss(x, P, y) + slf.subcenter_arcface_loss(x, P3, y)
        return out + slf.soft_triple_loss(x, P10, y, reduction="sum") + slf.proxy_nca_loss(x, P, y)

    x = torch.randn(16, 8, requires_grad=True)
    P, P3, P10 = (torch.randn(5 * k, 8, requires_grad=True) for k in (1, 3, 10))
    y = torch.randint(0, 5, (16,))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, P, P3, P10, y)
    got = torch.autograd.grad(out, [x, P, P3, P10])
    expected = step(x, P, P3, P10, y)
    want = torch.autograd.grad(expected, [x, P, P3, P10])
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_second_backward_through_the_same_graph():
    """retain_graph: the forward's gradients are scaled out of place, a second backward agrees."""
    x, P, y = problem(12, 4, 5, 3)
    x.requires_grad_(True)
    P.requires_grad_(True)
    out = slf.subcenter_arcface_loss(x, P, y)
    g1 = torch.autograd.grad(out, [x, P], retain_graph=True)
    g2 = torch.autograd.grad(out, [x, P])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    with pytest.raises(RuntimeError, match="no second derivative"):
        gx, = torch.autograd.grad(slf.proxy_anchor_loss(x, P[:4], y), [x], create_graph=True)
        gx.sum().backward()


def test_auto_uses_the_cpu_kernels(monkeypatch):
    for name in ("proxy_anchor_loss", "proxy_nca_loss", "margin_loss", "pool_cosines"):
        monkeypatch.setattr(ref, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("reference")))
    x, P, y = problem(10, 4, 3, 3)
    slf.subcenter_arcface_loss(x, P, y)
    slf.soft_triple_loss(x, torch.randn(40, 3, dtype=torch.float64), y)
    slf.proxy_anchor_loss(x, P[:4], y)
    slf.proxy_nca_loss(x, P[:4], y)
    slf.normalized_softmax_loss(x, P[:4], y)


def test_new_ops_are_declared_cpu_only():
    for name in (ops.POOLED_OP, ops.PROXY_ANCHOR_OP):
        spec = _registry.op(name)
        assert spec.kernels == ("cpu",) and spec.candidates("cuda") == ()


# ---------------------------------------------------------------- edge cases


def test_proxy_nca_drops_rows_of_probability_zero_as_pml():
    """With a scale that lets p_y underflow, PML leaves those rows out of the mean: so do we (the
    kept rows' losses are then compared with float64, PML's own float32 values of losses near
    100 being computed from subnormal probabilities)."""
    C, D, N, s = 6, 4, 20, 60.0
    pml = pml_losses.ProxyNCALoss(C, D, softmax_scale=s)
    x, y = torch.randn(N, D), torch.randint(0, C, (N,))
    with torch.no_grad():
        x[:5] = -pml.proxies[y[:5]] * 3  # far from their own proxies: p_y = 0 in float32
        d2 = torch.cdist(F.normalize(x), F.normalize(pml.proxies)) ** 2
        keep = torch.softmax(-s * d2, dim=1)[torch.arange(N), y] != 0  # PML's non_zero
    assert not keep[:5].any() and keep.any()
    P = pml.proxies.detach().clone()
    rows = slf.proxy_nca_loss(x, P, y, softmax_scale=s, reduction="none")
    assert (rows[~keep] == 0).all()
    exact = slf.proxy_nca_loss(x.double(), P.double(), y, softmax_scale=s, reduction="none")
    expected = exact[keep].mean()
    out = slf.proxy_nca_loss(x, P, y, softmax_scale=s)
    assert abs(out.item() - expected.item()) <= 1e-5 * expected.item()
    assert abs(pml(x, y).item() - expected.item()) <= 1e-2 * expected.item()
    assert_tight(slf.proxy_nca_loss(x, P, y, softmax_scale=s, backend="reference"), out, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_empty_batch_and_non_finite_input(loss):
    params = loss.params
    K = groups(loss, params)
    P = torch.randn(4 * K, 3, requires_grad=True)
    x = torch.randn(0, 3, requires_grad=True)
    out = loss.fn(x, P, torch.zeros(0, dtype=torch.long), **params)
    assert out.item() == 0.0
    out.backward()
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    assert torch.isnan(loss.fn(x, P, torch.tensor([0, 1, 2, 3, 0, 1]), **params))


def test_proxy_anchor_reductions_and_absent_classes():
    x, P, y = problem(10, 6, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])  # proxies 3, 4, 5 have no rows
    per = slf.proxy_anchor_loss(x, P, y, reduction="none")
    pos, neg, n_with = ref.proxy_anchor_terms(x, P, y)
    assert per.shape == (6,) and int(n_with) == 3
    assert_tight(per, pos + neg)
    assert_tight(slf.proxy_anchor_loss(x, P, y, reduction="sum"), (pos + neg).sum())
    assert_tight(slf.proxy_anchor_loss(x, P, y), pos.sum() / 3 + neg.sum() / 6)
    assert (pos[3:] == 0).all()


def test_subcenter_outliers_match_pml():
    C, D = 4, 6
    torch.manual_seed(3)
    pml = pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D)
    mod = slf.SubCenterArcFaceLoss(num_classes=C, embedding_size=D)
    with torch.no_grad():
        mod.proxies.copy_(pml.W.T)
    x, y = torch.randn(40, D), torch.randint(0, C, (40,))
    outliers, centers = mod.get_outliers(x, y, threshold=60)
    e_outliers, e_centers = pml.get_outliers(x, y, threshold=60)
    assert torch.equal(outliers.sort().values, e_outliers.sort().values.to(outliers.dtype))
    present = torch.unique(y)
    assert torch.allclose(centers[present], e_centers.T[present])
    assert torch.equal(mod.get_outliers(x, y, threshold=60, return_dominant_centers=False), outliers)
    assert mod.logits(x).shape == (40, C)


@pytest.mark.parametrize(
    "name,kwargs,exc,match",
    [
        ("normalized_softmax", dict(temperature=0.0), ValueError, "temperature must be > 0"),
        ("proxy_nca", dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
        ("subcenter_arcface", dict(sub_centers=0), ValueError, "sub_centers must be a positive int"),
        ("subcenter_arcface", dict(margin=28.6), ValueError, "margin must be <="),
        ("soft_triple", dict(gamma=0.0), ValueError, "gamma must be > 0"),
        ("soft_triple", dict(centers_per_class=2.5), ValueError, "centers_per_class must be a positive int"),
        ("proxy_anchor", dict(alpha=0.0), ValueError, "alpha must be > 0"),
        ("proxy_anchor", dict(margin=float("nan")), ValueError, "margin must be finite"),
        ("proxy_anchor", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_parameters(name, kwargs, exc, match):
    loss = BY_NAME[name]
    K = 3 if name == "subcenter_arcface" else (10 if name == "soft_triple" else 1)
    with pytest.raises(exc, match=match):
        loss.fn(torch.randn(4, 3), torch.randn(5 * K, 3), torch.zeros(4, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_bad_input(loss):
    K = groups(loss, loss.params)
    x, P, y = torch.randn(4, 3), torch.randn(5 * K, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must hold class indices|labels must"):
        loss.fn(x, P, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="proxies must be"):
        loss.fn(x, torch.randn(5 * K, 4), y)
    with pytest.raises(ValueError, match="labels must have one entry per row"):
        loss.fn(x, P, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="embeddings must be float"):
        loss.fn(x.long(), P, y)
    if K > 1:
        with pytest.raises(ValueError, match=f"{K} rows .centers. per class"):
            loss.fn(x, torch.randn(5 * K + 1, 3), y)

"""Margin-softmax heads (NormFace, CosFace, ArcFace, class-level Circle) composed with
cross-entropy or the Encouraging Loss: fused and unfused kernels against the reference, and
against pytorch-metric-learning's NormalizedSoftmaxLoss / CosFaceLoss / ArcFaceLoss."""
from __future__ import annotations

import math

import pytest
import torch

import structloss_fast as slf
from structloss_fast.softmax import reference as ref
from tests.helpers import LazyImport, assert_close_to_truth, assert_tight, fast_backends

FUSED = fast_backends("linear_softmax_loss")
UNFUSED = fast_backends("softmax_loss")
CASES = [(b, d, True) for b, d in FUSED] + [(b, d, False) for b, d in UNFUSED]
CASE_IDS = [f"{b}-{'fused' if f else 'unfused'}" for b, _, f in CASES]

HEADS = {
    "normface": (slf.normface_loss, dict(scale=20.0), (20.0, 0.0)),
    "cosface": (slf.cosface_loss, dict(margin=0.35, scale=64.0), (64.0, 0.35)),
    "arcface": (slf.arcface_loss, dict(margin=math.radians(28.6), scale=64.0), (64.0, math.radians(28.6))),
    "circle": (slf.circle_class_loss, dict(m=0.25, gamma=256.0), (256.0, 0.25)),
}


def problem(N=12, D=5, C=23, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, W, y


def run(fn, x, W, y, device, seed=3, **kw):
    xd, Wd = (t.detach().to(device).requires_grad_(True) for t in (x, W))
    loss = fn(xd, Wd, y.to(device), **kw)
    v = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((loss * v.to(device=device, dtype=loss.dtype)).sum(), [xd, Wd])
    return loss.detach().cpu(), [g.cpu() for g in grads]


def reference(kind, t0, t1):
    return lambda x, W, y, **kw: ref.margin_loss(kind, x, W, y, t0, t1, **kw)


@pytest.mark.parametrize("backend,device,fused", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("opts", [dict(), dict(bonus_weight=1.0, log_end=0.75, label_smoothing=0.1),
                                  dict(bonus_weight=1.0, log_end=1.0, reduction="none")], ids=["ce", "el-ls", "el-none"])
def test_heads_match_reference_float64(backend, device, fused, kind, opts):
    fn, params, (t0, t1) = HEADS[kind]
    x, W, y = problem()
    y[4] = -100
    out, g = run(lambda *a, **k: fn(*a, **k, **params, fused=fused, backend=backend), x, W, y, device, **opts)
    exp, eg = run(reference(kind, t0, t1), x, W, y, torch.device("cpu"), **opts)
    assert_tight(out, exp, rtol=1e-10, what="loss")
    for name, a, e in zip(("embeddings", "weight"), g, eg):
        assert_tight(a, e, rtol=1e-8, what=f"d/d{name}")


@pytest.mark.parametrize("backend,device,fused", CASES, ids=CASE_IDS)
def test_arcface_beyond_pi_minus_m(backend, device, fused):
    """Targets at an angle above pi - m take the monotone continuation s (cos - m sin m)."""
    x, W, y = problem(N=6, C=9)
    x[:3] = -W[y[:3]] + 0.05 * torch.randn(3, 5, dtype=torch.float64)  # cos_y near -1
    cos = ref.cosine_logits(x, W)[torch.arange(6), y]
    assert (cos[:3] < math.cos(math.pi - 0.5)).all()
    fn, params, (t0, t1) = HEADS["arcface"]
    out, g = run(lambda *a, **k: fn(*a, **k, **params, fused=fused, backend=backend), x, W, y, device,
                 reduction="none")
    exp, eg = run(reference("arcface", t0, t1), x, W, y, torch.device("cpu"), reduction="none")
    assert_tight(out, exp, rtol=1e-10)
    assert_tight(g[0], eg[0], rtol=1e-8)


@pytest.mark.parametrize("backend,device,fused", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", list(HEADS))
def test_heads_float32(backend, device, fused, kind):
    fn, params, (t0, t1) = HEADS[kind]
    x, W, y = problem(N=32, D=16, C=50)
    truth, tg = run(reference(kind, t0, t1), x, W, y, torch.device("cpu"))
    t32, t32g = run(reference(kind, t0, t1), x.float(), W.float(), y, torch.device("cpu"))
    out, g = run(lambda *a, **k: fn(*a, **k, **params, fused=fused, backend=backend), x.float(), W.float(), y,
                 device)
    assert_close_to_truth(out, truth, t32, floor=1e-6 * truth.abs().item(), what="loss")
    for a, e, lo in zip(g, tg, t32g):
        assert_close_to_truth(a, e, lo, floor=1e-6 * e.abs().max().item(), what="grad")


pml_losses = LazyImport("pytorch_metric_learning.losses")

PML = {
    "normface": lambda C, D: pml_losses.NormalizedSoftmaxLoss(num_classes=C, embedding_size=D),
    "cosface": lambda C, D: pml_losses.CosFaceLoss(num_classes=C, embedding_size=D),
    "arcface": lambda C, D: pml_losses.ArcFaceLoss(num_classes=C, embedding_size=D),
}
MODULES = {"normface": slf.NormFaceLoss, "cosface": slf.CosFaceLoss, "arcface": slf.ArcFaceLoss}


@pytest.mark.parametrize("backend,device,fused", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", list(PML))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pytorch_metric_learning(backend, device, fused, kind, dtype):
    """PML's heads with their defaults, same class weights (PML stores W as (D, C)): same loss
    and gradients for the embeddings and the weights."""
    N, D, C = 16, 8, 11
    torch.manual_seed(1)
    pml = PML[kind](C, D).to(dtype)
    ours = MODULES[kind](C, D, fused=fused, backend=backend, dtype=dtype).to(device)
    with torch.no_grad():
        ours.proxies.copy_(pml.W.t())
    x = torch.randn(N, D, dtype=dtype)
    y = torch.randint(0, C, (N,))
    xp = x.clone().requires_grad_(True)
    expected = pml(xp, y)
    expected.backward()
    xd = x.to(device).requires_grad_(True)
    out = ours(xd, y.to(device))
    out.backward()
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    assert abs(out.item() - expected.item()) <= rtol * max(1.0, abs(expected.item()))
    assert_tight(xd.grad.cpu(), xp.grad, rtol=rtol * 10, atol=1e-12)
    assert_tight(ours.proxies.grad.cpu(), pml.W.grad.t(), rtol=rtol * 10, atol=1e-12)


@pytest.mark.parametrize("backend,device", FUSED, ids=[b for b, _ in FUSED])
def test_circle_class_level_is_the_pairwise_form(backend, device):
    """Class-level Circle loss = log(1 + sum_n exp(gamma a_n (s_n - m)) sum_p exp(-gamma a_p (s_p - 1 + m)))
    with the class weights as the only references (one positive per row)."""
    x, W, y = problem(N=8, D=4, C=6)
    out = slf.circle_class_loss(x, W, y, reduction="none", backend=backend)
    s = ref.cosine_logits(x, W)
    m, gamma = 0.25, 256.0
    sp = s[torch.arange(8), y]
    pos = -gamma * torch.relu(1 + m - sp) * (sp - (1 - m))
    neg = gamma * torch.relu(s + m) * (s - m)
    neg = neg.masked_fill(torch.nn.functional.one_hot(y, 6).bool(), float("-inf"))
    expected = torch.nn.functional.softplus(torch.logsumexp(neg, dim=1) + pos)
    assert_tight(out, expected, rtol=1e-10)


def test_modules_hold_parameters_and_repr():
    head = slf.CircleClassLoss(7, 4, bonus_weight=1.0)
    assert isinstance(head.proxies, torch.nn.Parameter) and head.proxies.shape == (7, 4)
    assert [n for n, _ in head.named_parameters()] == ["proxies"]
    x = torch.randn(5, 4)
    y = torch.randint(0, 7, (5,))
    loss = head(x, y)
    loss.backward()
    assert head.proxies.grad is not None
    assert "gamma=256.0" in repr(head) and "bonus_weight=1.0" in repr(head)
    assert head.logits(x).shape == (5, 7)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(W=torch.randn(7, 5)), ValueError, r"proxies must be \(num_classes, D\) with D=4"),
        (dict(y=torch.tensor([0, 9, 1])), ValueError, r"labels must hold class indices in \[0, 7\)"),
        (dict(y=torch.zeros(2, dtype=torch.long)), ValueError, "labels must have one entry per row"),
        (dict(scale=0.0), ValueError, "scale must be > 0"),
        (dict(margin=-0.1), ValueError, "margin must be >= 0"),
        (dict(log_end=0.0), ValueError, "log_end must be > 0"),
        (dict(x=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "embeddings must be float16"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, match):
    x = kwargs.pop("x", torch.randn(3, 4))
    W = kwargs.pop("W", torch.randn(7, 4))
    y = kwargs.pop("y", torch.zeros(3, dtype=torch.long))
    with pytest.raises(exc, match=match):
        slf.cosface_loss(x, W, y, **kwargs)


# ---------------------------------------------------------------- PML state_dicts and units


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_pml_state_dict_loads_and_gives_pml_loss(name):
    """PML keeps W (embedding_size, num_classes); ours proxies (num_classes, embedding_size):
    load_state_dict of PML's dict, and from_pml, give PML's loss and gradients."""
    C, D = 7, 12
    torch.manual_seed(0)
    pml = getattr(pml_losses, {"arcface": "ArcFaceLoss", "cosface": "CosFaceLoss"}[name])(num_classes=C, embedding_size=D)
    pml = pml.double()
    ours_cls = {"arcface": slf.ArcFaceLoss, "cosface": slf.CosFaceLoss}[name]
    x = torch.randn(20, D, dtype=torch.float64)
    y = torch.randint(0, C, (20,))
    loaded = ours_cls(C, D, dtype=torch.float64)
    loaded.load_state_dict(pml.state_dict())
    assert torch.equal(loaded.proxies, pml.W.t())
    copied = ours_cls.from_pml(pml)
    xe = x.clone().requires_grad_()
    expected = pml(xe, y)
    expected.backward()
    for ours in (loaded, copied):
        xo = x.clone().requires_grad_()
        got = ours(xo, y)
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(xo.grad, xe.grad, rtol=1e-8, atol=1e-10)


def test_pml_state_dict_of_another_shape_names_both_layouts():
    pml = pml_losses.ArcFaceLoss(num_classes=5, embedding_size=8)
    with pytest.raises(RuntimeError, match=r"\(embedding_size, num_classes\) = \(8, 6\).*got \(8, 5\)"):
        slf.ArcFaceLoss(6, 8).load_state_dict(pml.state_dict())


def test_arcface_margin_in_degrees_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="takes degrees"):
        slf.ArcFaceLoss(10, 8, margin=28.6)
    with pytest.raises(ValueError, match=r"math.radians\(28.6\) = 0.4992"):
        slf.arcface_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), margin=28.6)
    with pytest.raises(TypeError, match="takes pytorch-metric-learning's ArcFaceLoss"):
        slf.ArcFaceLoss.from_pml(pml_losses.CosFaceLoss(num_classes=3, embedding_size=4))

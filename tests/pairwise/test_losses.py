"""The pairwise family on the fused engine: every loss and backend against the reference (the
definition) and against pytorch-metric-learning, gradients, custom-op registration, low
precision, edge cases and bad input."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
import structloss_fast as slf
from structloss_fast import _registry
from structloss_fast._ids import PAIR_LOSSES_WITH_ROW_PARAMS
from structloss_fast.pairwise import _ops as ops
from structloss_fast.pairwise import _triton as triton_kernels
from structloss_fast.pairwise import reference as ref
from tests.helpers import (LazyImport, assert_close_to_truth, assert_tight, can_run, fast_backends, max_abs,
                           numerical_grad, triton_device)

pml_losses = LazyImport("pytorch_metric_learning.losses")
pml_miners = LazyImport("pytorch_metric_learning.miners")

BACKENDS = fast_backends("pairwise_loss")
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]
# The compiled engine's device-independent ATen epilogue (the CUDA backend's path for most
# losses) is tested on CPU as its own "backend".
WITH_ATEN = BACKENDS + [("aten", torch.device("cpu"))]
WITH_ATEN_IDS = BACKEND_IDS + ["aten-cpu"]


class Loss:
    def __init__(self, name, fn, rfn, op_name, params, other, pml=None, kw=None, pml_refs=True):
        self.name, self.fn, self.rfn, self.op_name = name, fn, rfn, op_name
        self.params, self.other, self.pml, self.kw = params, other, pml, kw or {}
        self.pml_refs = pml_refs  # PML's class takes ref_emb

    def __repr__(self):
        return self.name


def _pml_triplet_hard(**p):
    loss = pml_losses.TripletMarginLoss(**p)
    miner = pml_miners.BatchHardMiner()

    def call(x, y, ref_emb=None, ref_labels=None):
        return loss(x, y, miner(x, y, ref_emb, ref_labels), ref_emb, ref_labels)

    return call


LOSSES = [
    Loss("circle", slf.circle_loss, ref.circle_loss, "circle", dict(m=0.4, gamma=80.0), dict(m=0.25, gamma=256.0),
         pml_losses.CircleLoss),
    Loss("unified", slf.unified_loss, ref.unified_loss, "unified", dict(m=0.35, gamma=64.0), dict(m=0.1, gamma=16.0)),
    Loss("multi_similarity", slf.multi_similarity_loss, ref.multi_similarity_loss, "multi_similarity",
         dict(alpha=2.0, beta=50.0, base=0.5), dict(alpha=1.0, beta=20.0, base=0.3), pml_losses.MultiSimilarityLoss),
    Loss("supcon", slf.supcon_loss, ref.supcon_loss, "supcon", dict(temperature=0.1), dict(temperature=0.5),
         pml_losses.SupConLoss),
    Loss("ntxent", slf.ntxent_loss, ref.ntxent_loss, "ntxent", dict(temperature=0.07), dict(temperature=0.5),
         pml_losses.NTXentLoss),
    Loss("contrastive", slf.contrastive_loss, ref.contrastive_loss, "contrastive",
         dict(pos_margin=0.0, neg_margin=1.0), dict(pos_margin=0.3, neg_margin=1.2), pml_losses.ContrastiveLoss),
    Loss("triplet_all", slf.triplet_margin_loss, ref.triplet_margin_loss, "triplet_all", dict(margin=0.05),
         dict(margin=0.3), pml_losses.TripletMarginLoss, kw=dict(mining="all")),
    Loss("triplet_hard", slf.triplet_margin_loss, ref.triplet_margin_loss, "triplet_hard", dict(margin=0.05),
         dict(margin=0.3), _pml_triplet_hard, kw=dict(mining="batch_hard")),
    Loss("generalized_lifted_structure", slf.generalized_lifted_structure_loss, ref.generalized_lifted_structure_loss,
         "generalized_lifted_structure", dict(pos_margin=0.0, neg_margin=1.0), dict(pos_margin=0.2, neg_margin=0.7),
         pml_losses.GeneralizedLiftedStructureLoss),
    Loss("tuplet_margin", slf.tuplet_margin_loss, ref.tuplet_margin_loss, "tuplet_margin",
         dict(margin=math.radians(5.73), scale=64.0), dict(margin=0.3, scale=16.0),
         lambda margin, scale: pml_losses.TupletMarginLoss(margin=math.degrees(margin), scale=scale)),
    # beta as PML holds it (a float32 tensor), so that float64 runs match to the last bit.
    Loss("margin", slf.margin_based_loss, ref.margin_based_loss, "margin", dict(margin=0.2, beta=torch.tensor([1.2])),
         dict(margin=0.1, beta=torch.tensor([0.8])),
         lambda margin, beta: pml_losses.MarginLoss(margin=margin, beta=float(beta))),
    Loss("fastap", slf.fastap_loss, ref.fastap_loss, "fastap", dict(num_bins=10), dict(num_bins=4),
         pml_losses.FastAPLoss, pml_refs=False),
]
# The losses on pairwise_loss_rowparam (a parameter per anchor) rather than pairwise_loss.
ROWPARAM_LOSSES = {lo.name for lo in LOSSES if ops.LOSSES[lo.op_name] in PAIR_LOSSES_WITH_ROW_PARAMS}
LOSS_BY_NAME = {lo.name: lo for lo in LOSSES}


def supported(backend, loss):
    return not (backend == "triton" and ops.LOSSES[loss.op_name] not in triton_kernels.SUPPORTED)


def combos(backends, losses=LOSSES):
    return [pytest.param(b, d, lo, id=f"{b}-{d.type}-{lo.name}") for b, d in backends for lo in losses
            if supported(b, lo)]


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
    if kind == "two_views":  # two samples per class, as for NT-Xent / SimCLR batches
        return torch.arange(B) // 2
    raise ValueError(kind)


PATTERNS = ["random", "singletons", "one_class", "all_distinct", "two_views"]


def call(loss, backend, x, y, params=None, **kw):
    """The loss through a backend; backend "aten" is the compiled CPU op with the ATen epilogue."""
    params = loss.params if params is None else params
    if backend == "aten":
        with aten_epilogue():
            return loss.fn(x, y, backend="cpu", **params, **loss.kw, **kw)
    return loss.fn(x, y, backend=backend, **params, **loss.kw, **kw)


EPILOGUE_ENV = "STRUCTLOSS_FAST_PAIRWISE_EPILOGUE"


@contextlib.contextmanager
def aten_epilogue():
    """The compiled ops with the device-independent ATen epilogue (the test switch is an
    environment variable, read by the kernels on every call)."""
    old = os.environ.get(EPILOGUE_ENV)
    os.environ[EPILOGUE_ENV] = "aten"
    try:
        yield
    finally:
        if old is None:
            del os.environ[EPILOGUE_ENV]
        else:
            os.environ[EPILOGUE_ENV] = old


def run(loss, backend, device, x, y, ref_x=None, ref_y=None, params=None, weights_seed=7, **kw):
    """Loss and gradients (embeddings[, references]) of a backend on `device`."""
    xd = x.detach().to(device).requires_grad_(True)
    rd = None if ref_x is None else ref_x.detach().to(device).requires_grad_(True)
    extra = {} if ref_x is None else dict(ref_embeddings=rd, ref_labels=ref_y.to(device))
    out = call(loss, backend, xd, y.to(device), params, **extra, **kw)
    v = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(weights_seed))
    inputs = [xd] + ([rd] if rd is not None else [])
    grads = torch.autograd.grad((out * v.to(device=device, dtype=out.dtype)).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return out.detach().cpu(), [g.cpu() for g in grads]


def run_reference(loss, x, y, ref_x=None, ref_y=None, params=None, weights_seed=7, **kw):
    params = loss.params if params is None else params
    xd = x.detach().clone().requires_grad_(True)
    rd = None if ref_x is None else ref_x.detach().clone().requires_grad_(True)
    out = loss.rfn(xd, y, **params, **loss.kw, ref_embeddings=rd, ref_labels=ref_y, **kw)
    v = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(weights_seed))
    inputs = [xd] + ([rd] if rd is not None else [])
    grads = torch.autograd.grad((out * v.to(out.dtype)).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return out.detach(), grads


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("backend,device,loss", combos(WITH_ATEN))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_float64_matches_reference(backend, device, loss, reduction, pattern):
    if backend == "triton" and reduction == "sum" and pattern in ("singletons", "all_distinct"):
        pytest.skip("covered by the other reductions under the (slow) Triton interpreter")
    B, D = (18, 9) if backend == "triton" else (41, 13)
    x = torch.randn(B, D, dtype=torch.float64)
    y = labels_pattern(pattern, B)
    out, grads = run(loss, backend, device, x, y, reduction=reduction)
    exp, exp_grads = run_reference(loss, x, y, reduction=reduction)
    assert out.shape == exp.shape
    assert_tight(out, exp, what="loss")
    for g, e in zip(grads, exp_grads):
        assert_tight(g, e, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device,loss", combos(WITH_ATEN))
@pytest.mark.parametrize("M,self_index", [(1, None), (6, None), (37, None), (37, 30), (40, 0)])
def test_references_and_self_index(backend, device, loss, M, self_index):
    """References of another length, with gradient; ref_self_index as a memory queue uses it
    (anchor i is reference (self_index + i) mod M, wrapping around)."""
    B, D = 13, 8
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 4, (B,))
    rx = torch.randn(M, D, dtype=torch.float64)
    ry = torch.randint(0, 4, (M,))
    if self_index is not None:  # the batch sits in the memory at self_index (mod M)
        idx = (self_index + torch.arange(B)) % M
        rx[idx], ry[idx] = x, y
    for reduction in ("mean", "none"):
        out, grads = run(loss, backend, device, x, y, rx, ry, reduction=reduction, ref_self_index=self_index)
        exp, exp_grads = run_reference(loss, x, y, rx, ry, reduction=reduction, ref_self_index=self_index)
        assert_tight(out, exp, what="loss")
        assert len(grads) == 2
        for g, e in zip(grads, exp_grads):
            assert_tight(g, e, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device,loss", combos(BACKENDS))
@pytest.mark.parametrize("setting", ["default", "other"])
def test_float32_within_2x_torch_error(backend, device, loss, setting):
    """fp32 against the fp64 truth: no worse than twice PyTorch's own fp32 error (plus a floor)."""
    params = loss.params if setting == "default" else loss.other
    B, D = (29, 16) if backend == "triton" else (96, 32)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 12, (B,))
    truth, truth_g = run_reference(loss, x, y, params=params)
    torch32, torch32_g = run_reference(loss, x.float(), y, params=params)
    out, g = run(loss, backend, device, x.float(), y, params=params)
    scale = max(truth.abs().max().item(), 1.0)
    assert_close_to_truth(out, truth, torch32, floor=1e-6 * scale, what="loss")
    gscale = max(truth_g[0].abs().max().item(), 1e-3)
    assert_close_to_truth(g[0], truth_g[0], torch32_g[0], floor=1e-6 * gscale, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gamma", [1.0, 256.0, 1024.0])
@pytest.mark.parametrize("m", [0.0, 0.25, 0.9])
def test_circle_float32_large_scales(backend, device, gamma, m):
    B, D = (29, 16) if backend == "triton" else (96, 32)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 12, (B,))
    loss = LOSS_BY_NAME["circle"]
    params = dict(m=m, gamma=gamma)
    truth, truth_g = run_reference(loss, x, y, params=params)
    torch32, torch32_g = run_reference(loss, x.float(), y, params=params)
    out, g = run(loss, backend, device, x.float(), y, params=params)
    assert_close_to_truth(out, truth, torch32, floor=1e-6 * max(truth.abs().item(), 1.0), what="loss")
    assert_close_to_truth(g[0], truth_g[0], torch32_g[0], floor=1e-6 * truth_g[0].abs().max().item(), what="grad")


@pytest.mark.parametrize("backend,device,loss", combos(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_torch_error(backend, device, loss, dtype):
    B, D = (32, 16) if backend == "triton" else (64, 32)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 10, (B,))
    truth, truth_g = run_reference(loss, x, y)
    low, low_g = run_reference(loss, x.to(dtype), y)
    out, g = run(loss, backend, device, x.to(dtype), y)
    assert out.dtype == dtype and g[0].dtype == dtype
    assert_close_to_truth(out, truth, low, floor=1e-3 * max(truth.abs().item(), 1.0), what="loss")
    assert_close_to_truth(g[0], truth_g[0], low_g[0], floor=1e-3 * truth_g[0].abs().max().item(), what="grad")


# ---------------------------------------------------------------- parity with PML


PML_LOSSES = [lo for lo in LOSSES if lo.pml is not None]


@pytest.mark.parametrize("backend,device,loss", combos(BACKENDS, PML_LOSSES))
@pytest.mark.parametrize("setting", ["default", "other"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("B", [1, 2, 3, 24])
def test_matches_pml_float64(backend, device, loss, setting, pattern, B):
    params = loss.params if setting == "default" else loss.other
    x = torch.randn(B, 12, dtype=torch.float64)
    y = labels_pattern(pattern, B)
    xp = x.clone().requires_grad_(True)
    expected = loss.pml(**params)(xp, y)
    expected.backward()
    xd = x.to(device).requires_grad_(True)
    out = call(loss, backend, xd, y.to(device), params)
    out.backward()
    assert_tight(out.detach().cpu(), expected.detach(), what="loss")
    assert_tight(xd.grad.cpu(), xp.grad, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device,loss", combos(BACKENDS, [lo for lo in PML_LOSSES if lo.pml_refs]))
def test_matches_pml_float32_with_refs(backend, device, loss):
    B, M, D = 40, 30, 24
    x = torch.randn(B, D)
    y = torch.randint(0, 6, (B,))
    rx = torch.randn(M, D)
    ry = torch.randint(0, 6, (M,))
    xp, rp = x.clone().requires_grad_(True), rx.clone().requires_grad_(True)
    expected = loss.pml(**loss.params)(xp, y, ref_emb=rp, ref_labels=ry)
    expected.backward()
    xd = x.to(device).requires_grad_(True)
    rd = rx.to(device).requires_grad_(True)
    out = call(loss, backend, xd, y.to(device), ref_embeddings=rd, ref_labels=ry.to(device))
    out.backward()
    assert abs(out.item() - expected.item()) <= 2e-5 * max(1.0, abs(expected.item()))
    assert max_abs(xd.grad, xp.grad) <= 2e-5 * xp.grad.abs().max().item() + 1e-7
    assert max_abs(rd.grad, rp.grad) <= 2e-5 * rp.grad.abs().max().item() + 1e-7


@pytest.mark.parametrize("name", [lo.name for lo in PML_LOSSES])
def test_module_is_a_drop_in_for_pml(name):
    """The nn.Module takes PML's constructor keywords and call signature."""
    loss = LOSS_BY_NAME[name]
    modules = {
        "circle": slf.CircleLoss, "multi_similarity": slf.MultiSimilarityLoss, "supcon": slf.SupConLoss,
        "ntxent": slf.NTXentLoss, "contrastive": slf.ContrastiveLoss,
        "triplet_all": slf.TripletMarginLoss, "triplet_hard": lambda **p: slf.TripletMarginLoss(mining="batch_hard", **p),
        "generalized_lifted_structure": slf.GeneralizedLiftedStructureLoss, "tuplet_margin": slf.TupletMarginLoss,
        "margin": lambda margin, beta: slf.MarginLoss(margin=margin, beta=float(beta)), "fastap": slf.FastAPLoss,
    }
    x = torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    rx, ry = torch.randn(9, 8, dtype=torch.float64), torch.randint(0, 4, (9,))
    mod = modules[name](**loss.other)
    assert torch.allclose(mod(x, y), loss.pml(**loss.other)(x, y), rtol=1e-10, atol=1e-12)
    if loss.pml_refs:
        assert torch.allclose(mod(x, y, ref_emb=rx, ref_labels=ry),
                              loss.pml(**loss.other)(x, y, ref_emb=rx, ref_labels=ry), rtol=1e-10, atol=1e-12)
    assert "reduction='mean'" in repr(mod)
    t = (torch.tensor([0, 1, 5]), torch.tensor([1, 2, 3]), torch.tensor([2, 7, 9]))
    if name == "triplet_hard":  # mining="batch_hard" mines its own triplets
        with pytest.raises(ValueError, match="mining='batch_hard'"):
            mod(x, y, indices_tuple=t)
    else:  # a miner's tuple, as PML reads it (tests/pairwise/test_pml_api.py covers the rest)
        assert torch.allclose(mod(x, y, t), loss.pml(**loss.other)(x, y, t), rtol=1e-10, atol=1e-12)


def test_ntxent_two_views_per_class_matches_pml():
    """NT-Xent's usual batch (SimCLR-style: two views per class), where PML's P x N tensor is small."""
    B = 64
    x = torch.randn(B, 16, dtype=torch.float64, requires_grad=True)
    y = torch.arange(B) // 2
    expected = pml_losses.NTXentLoss()(x, y)
    ge, = torch.autograd.grad(expected, x)
    out = slf.ntxent_loss(x, y)
    g, = torch.autograd.grad(out, x)
    assert_tight(out, expected)
    assert_tight(g, ge, rtol=1e-9)


# ---------------------------------------------------------------- gradients


def _frozen_alpha_circle(x0, y, m, gamma, reduction, r0=None, ry=None):
    """Circle loss as a function of the embeddings with the alphas frozen at (x0, r0): its
    derivative at x0 is, by definition, the detached-alpha gradient of Circle loss."""
    s0 = ref.cosine_similarity(x0, x0 if r0 is None else r0)
    alpha_p, alpha_n = torch.relu(1 + m - s0), torch.relu(s0 + m)

    def f(x, r=None):
        return ref._twoset_loss(lambda s: -gamma * alpha_p * (s - (1 - m)), lambda s: gamma * alpha_n * (s - m),
                                x, y, r, ry, reduction)

    return f


@pytest.mark.parametrize("backend,device", [("reference", torch.device("cpu"))] + WITH_ATEN,
                         ids=["reference-cpu"] + WITH_ATEN_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_refs", [False, True])
def test_finite_differences_circle_float64(backend, device, reduction, with_refs):
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
    extra = dict(ref_embeddings=rd, ref_labels=ry.to(device)) if with_refs else {}
    out = call(LOSS_BY_NAME["circle"], backend, xd, y.to(device), dict(m=m, gamma=gamma), reduction=reduction, **extra)
    grads = torch.autograd.grad((out * v.to(device)).sum(), [xd] + ([rd] if with_refs else []))
    assert_tight(grads[0].cpu(), numerical_grad(lambda x: (f(x, r0) * v).sum(), x0), rtol=1e-6, atol=1e-8, what="d/dx")
    if with_refs:
        assert_tight(grads[1].cpu(), numerical_grad(lambda r: (f(x0, r) * v).sum(), r0), rtol=1e-6, atol=1e-8,
                     what="d/dref")


SMOOTH = [lo for lo in LOSSES if lo.name != "circle"]


def _gradcheck_params():
    # The Triton interpreter is slow: one reduction there ("none" exercises arbitrary upstream
    # weights, the general case of the recomputing backward); all three elsewhere.
    out = []
    for b, d, lo in [p.values for p in combos([("reference", torch.device("cpu"))] + WITH_ATEN, SMOOTH)]:
        for red in (["none"] if b == "triton" else ["mean", "sum", "none"]):
            out.append(pytest.param(b, d, lo, red, id=f"{b}-{lo.name}-{red}"))
    return out


@pytest.mark.parametrize("backend,device,loss,reduction", _gradcheck_params())
@pytest.mark.parametrize("sparse", ["auto", "forced"])
def test_gradcheck_float64(monkeypatch, backend, device, loss, reduction, sparse):
    """torch.autograd.gradcheck (float64) of every loss whose gradient is the derivative of its
    value (all but Circle, whose alphas are detached), embeddings and references; "forced" runs
    the CPU driver's sparse gradient accumulation on every strip."""
    if sparse == "forced":
        if backend not in ("cpu", "aten"):
            pytest.skip("the sparse accumulation is the CPU driver's")
        monkeypatch.setenv(SPARSE_ENV, "1")
    gen = torch.Generator().manual_seed(3)
    n, m, d = (6, 4, 3) if backend == "triton" else (7, 5, 4)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    r = torch.randn(m, d, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 2, 0, 2][:n], device=device)
    ry = torch.tensor([0, 1, 2, 2, 3][:m], device=device)
    params = dict(loss.params)
    if loss.name == "unified":
        params["gamma"] = 5.0
    assert torch.autograd.gradcheck(lambda x: call(loss, backend, x, y, params, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda x, r: call(loss, backend, x, y, params, reduction=reduction, ref_embeddings=r, ref_labels=ry), (x, r))


# ---------------------------------------------------------------- custom-op registration


def _op_args(device, loss_id, params, dtype=torch.float64, ref_is_x=True, self_offset=0, grad_mode=1, B=9, M=7, D=5):
    x = F.normalize(torch.randn(B, D, dtype=dtype), dim=1).to(device).requires_grad_(True)
    y = torch.randint(0, 3, (B,)).to(device)
    if ref_is_x:
        r, ry = x, y
    else:
        r = F.normalize(torch.randn(M, D, dtype=dtype), dim=1).to(device).requires_grad_(True)
        ry = torch.randint(0, 3, (M,)).to(device)
    return (x, y, r, ry, self_offset, ref_is_x, loss_id, params, grad_mode)


OPCHECK_CASES = [  # (ref_is_x, self_offset, grad_mode)
    (True, 0, 1), (False, -1, 2), (False, 3, 2), (True, 0, 0), (False, -1, 0), (False, 2, 0),
]


def _op_params(loss):
    return [float(v) for v in loss.params.values()]


MAIN_OP_LOSSES = [lo for lo in LOSSES if lo.name not in ROWPARAM_LOSSES]  # (the others: test_pml_losses.py)


@pytest.mark.parametrize("loss", MAIN_OP_LOSSES, ids=str)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_compiled_forward(loss, case):
    ref_is_x, self_offset, grad_mode = case
    loss_id = ops.LOSSES[loss.op_name]  # (contrastive, two terms, has a fused gradient too)
    args = _op_args("cpu", loss_id, _op_params(loss), ref_is_x=ref_is_x, self_offset=self_offset, grad_mode=grad_mode)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss.default, args)
    with aten_epilogue():
        torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss.default, args)


@pytest.mark.parametrize("loss", MAIN_OP_LOSSES, ids=str)
@pytest.mark.parametrize("ref_is_x", [True, False])
def test_opcheck_compiled_backward(loss, ref_is_x):
    loss_id = ops.LOSSES[loss.op_name]
    x, y, r, ry, so, rix, _, params, _ = _op_args("cpu", loss_id, _op_params(loss), ref_is_x=ref_is_x,
                                                  self_offset=0 if ref_is_x else 2)
    stats = torch.ops.structloss_fast.pairwise_loss(x, y, r, ry, so, rix, loss_id, params, 0)[0].detach()
    w = torch.randn(x.shape[0], ops.terms(loss_id), dtype=x.dtype)
    args = (x.detach(), y, r.detach(), ry, stats, w, so, rix, loss_id, params, not ref_is_x)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_backward.default, args)


@pytest.mark.parametrize("loss", [lo for lo in LOSSES if supported("triton", lo)], ids=str)
def test_opcheck_triton(loss):
    if not can_run("triton", "pairwise_loss"):
        pytest.skip("triton unavailable")
    loss_id = ops.LOSSES[loss.op_name]
    # One configuration per loss (the interpreter is slow), alternating between the two kinds.
    cases = [(True, 0), (False, 1)]
    for ref_is_x, self_offset in [cases[loss_id % 2]]:
        args = _op_args(triton_device(), loss_id, _op_params(loss), ref_is_x=ref_is_x, self_offset=self_offset,
                        grad_mode=0, B=5, M=4, D=3)
        torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_triton.default, args)
        x, y, r, ry, so, rix, _, params, _ = args
        stats = torch.ops.structloss_fast.pairwise_loss_triton(x, y, r, ry, so, rix, loss_id, params, 0)[0].detach()
        w = torch.randn(x.shape[0], ops.terms(loss_id), dtype=stats.dtype, device=x.device)
        torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_backward_triton.default,
                              (x.detach(), y, r.detach(), ry, stats, w, so, rix, loss_id, params, not rix))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_torch_compile_fullgraph(backend, device):
    def step(x, y, r, ry):
        out = slf.circle_loss(x * 2.0, y, backend=backend) + slf.supcon_loss(x, y, reduction="sum", backend=backend)
        out = out + slf.contrastive_loss(x, y, ref_embeddings=r, ref_labels=ry, backend=backend)
        return out + slf.ntxent_loss(x, y, reduction="none", backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    x = torch.randn(16, 8, device=device, requires_grad=True)
    y = torch.randint(0, 4, (16,), device=device)
    r = torch.randn(10, 8, device=device, requires_grad=True)
    ry = torch.randint(0, 4, (10,), device=device)
    out = compiled(x, y, r, ry)
    gx, gr = torch.autograd.grad(out, [x, r])
    expected = step(x, y, r, ry)
    ex, er = torch.autograd.grad(expected, [x, r])
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gx, ex, rtol=1e-4, atol=1e-6) and torch.allclose(gr, er, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device,loss", combos([("reference", torch.device("cpu"))] + WITH_ATEN))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, device, loss, reduction):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    out = call(loss, backend, x, y, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend,device,loss", combos(WITH_ATEN))
@pytest.mark.parametrize("B", [1, 2])
def test_no_pairs_gives_zero_with_gradient(backend, device, loss, B):
    """B = 1, or B = 2 with different labels: no anchor has a positive."""
    x = torch.randn(B, 8, device=device, requires_grad=True)
    y = torch.arange(B, device=device)
    out = call(loss, backend, x, y)
    expected = loss.rfn(x.detach().cpu(), y.cpu(), **loss.params, **loss.kw)
    assert out.item() == pytest.approx(expected.item(), abs=1e-6)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if loss.name != "multi_similarity" and loss.name != "contrastive":  # these two have negative-only terms
        assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend,device,loss", combos(WITH_ATEN))
def test_non_contiguous_and_label_dtypes(backend, device, loss):
    base = torch.randn(30, 20, dtype=torch.float64)
    x = base[::2, 1::2]  # (15, 10), non-contiguous
    assert not x.is_contiguous()
    y64 = torch.randint(0, 4, (30,))[::2]
    expected, eg = run_reference(loss, x, y64)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        out, g = run(loss, backend, device, x, y64.to(dtype))
        assert_tight(out, expected, what=str(dtype))
        assert_tight(g[0], eg[0], rtol=1e-9, what=str(dtype))


def test_labels_beyond_int32_are_not_aliased():
    """Labels that differ only above 32 bits must stay different classes."""
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2**33, 2**33 + 1, 2**40, 2**40], dtype=torch.int64)
    for loss in LOSSES:
        out, g = run(loss, "cpu", torch.device("cpu"), x, y)
        exp, eg = run_reference(loss, x, y)
        assert_tight(out, exp, what=loss.name)
        assert_tight(g[0], eg[0], rtol=1e-9, what=loss.name)


@pytest.mark.parametrize("backend,device,loss", combos(WITH_ATEN))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_non_finite_embeddings_give_non_finite_loss(backend, device, loss, bad, reduction):
    x = torch.randn(12, 6)
    x[3, 2] = bad
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    out = call(loss, backend, x.to(device), y.to(device), reduction=reduction)
    assert not torch.isfinite(out).item()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name,params", [("circle", dict(m=0.4, gamma=1e4)), ("circle", dict(m=0.25, gamma=1e6)),
                                         ("supcon", dict(temperature=1e-3)), ("ntxent", dict(temperature=1e-3)),
                                         ("multi_similarity", dict(alpha=200.0, beta=5000.0, base=0.5))])
def test_huge_scale_stays_finite_and_exact(backend, device, name, params):
    loss = LOSS_BY_NAME[name]
    x = torch.randn(24, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    out, g = run(loss, backend, device, x, y, params=params)
    exp, eg = run_reference(loss, x, y, params=params)
    assert torch.isfinite(out).all() and torch.isfinite(g[0]).all()
    assert_tight(out, exp, rtol=1e-9)
    assert_tight(g[0], eg[0], rtol=1e-8)
    # float32: finite, and close to the float64 truth relative to the scale of the logits
    out32, g32 = run(loss, backend, device, x.float(), y, params=params)
    assert torch.isfinite(out32).all() and torch.isfinite(g32[0]).all()
    assert_tight(out32, exp, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_cpu_is_deterministic_and_strip_independent(loss):
    """Same input, same bits; and a batch larger than one strip matches the reference."""
    B, D = 2100, 16  # more rows than one strip of the CPU engine holds at M = 2100
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, 500, (B,))
    l1 = call(loss, "cpu", x, y)
    g1, = torch.autograd.grad(l1, x)
    l2 = call(loss, "cpu", x, y)
    g2, = torch.autograd.grad(l2, x)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    if loss.name in ("triplet_all", "fastap"):
        return  # their dense references are B x B x B and B x B x bins
    xd = x.detach().double().requires_grad_(True)
    exp = loss.rfn(xd, y, **loss.params, **loss.kw)
    eg, = torch.autograd.grad(exp, xd)
    assert abs(l1.item() - exp.item()) <= 1e-4 * abs(exp.item()) + 1e-6
    assert max_abs(g1, eg) <= 1e-4 * eg.abs().max().item() + 1e-9


SPARSE_ENV = "STRUCTLOSS_FAST_PAIRWISE_SPARSE"


@pytest.mark.parametrize("backend", ["cpu", "aten"])
@pytest.mark.parametrize("loss", LOSSES, ids=str)
@pytest.mark.parametrize("mode", ["0", "1"], ids=["dense-accumulation", "sparse-accumulation"])
@pytest.mark.parametrize("refs", ["self", "refs", "memory"])
def test_sparse_and_dense_gradient_accumulation(monkeypatch, backend, loss, mode, refs):
    """The CPU driver accumulates a strip's gradient with GEMMs or, when the strip is sparse,
    from its non-zeros (contrastive's two terms split by sign). Forced either way, every loss,
    reduction and reference set matches the reference; a NaN embedding gives NaN gradients."""
    monkeypatch.setenv(SPARSE_ENV, mode)
    B, D, M = 23, 6, (31 if refs == "memory" else 17)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, 5, (B,))
    rx = ry = idx = None
    if refs != "self":
        rx = torch.randn(M, D, dtype=torch.float64)
        ry = torch.randint(0, 5, (M,))
    kw = {}
    if refs == "memory":
        kw["ref_self_index"] = 9
        pos = (9 + torch.arange(B)) % M  # the batch sits in the memory, wrapping around
        rx[pos], ry[pos] = x, y
    for reduction in ("mean", "sum", "none"):
        out, grads = run(loss, backend, torch.device("cpu"), x, y, rx, ry, reduction=reduction, **kw)
        exp, exp_grads = run_reference(loss, x, y, rx, ry, reduction=reduction, **kw)
        assert_tight(out, exp, rtol=1e-10, atol=1e-12, what="loss")
        for g, e in zip(grads, exp_grads):
            assert_tight(g, e, rtol=1e-9, atol=1e-12, what=f"grad ({reduction})")
    xn = x.clone()
    xn[3, 1] = float("nan")
    _, grads = run(loss, backend, torch.device("cpu"), xn, y, rx, ry, **kw)
    monkeypatch.setenv(SPARSE_ENV, "1" if mode == "0" else "0")
    _, other = run(loss, backend, torch.device("cpu"), xn, y, rx, ry, **kw)
    # (The GEMMs also spread it through 0 * NaN products, the non-zero walk does not: the NaN
    # patterns may differ, the presence may not.)
    assert grads[0].isnan().any() and other[0].isnan().any(), "a NaN embedding must give NaN gradients"


@pytest.mark.parametrize("name", ["contrastive", "triplet_hard"])
def test_sparse_accumulation_chosen_by_density(monkeypatch, name):
    """At B = 600, D = 64 these gradients have a few non-zeros per row, under the driver's
    density threshold: the automatic choice (sparse) matches the reference and the GEMM path."""
    monkeypatch.delenv(SPARSE_ENV, raising=False)
    loss = LOSS_BY_NAME[name]
    x = torch.randn(600, 64, dtype=torch.float64)
    y = torch.arange(600) // 4
    out, grads = run(loss, "cpu", torch.device("cpu"), x, y)
    exp, exp_grads = run_reference(loss, x, y)
    assert_tight(out, exp, rtol=1e-10, atol=1e-12, what="loss")
    assert_tight(grads[0], exp_grads[0], rtol=1e-9, atol=1e-12, what="grad")
    monkeypatch.setenv(SPARSE_ENV, "0")
    _, dense = run(loss, "cpu", torch.device("cpu"), x, y)
    assert_tight(grads[0], dense[0], rtol=1e-12, atol=1e-14, what="sparse vs GEMM")


@pytest.mark.parametrize("backend,device", [b for b in WITH_ATEN if b[0] != "triton"], ids=[
    i for b, i in zip(WITH_ATEN, WITH_ATEN_IDS) if b[0] != "triton"])
@pytest.mark.parametrize("n_classes", [1, 2, 3, 40])
def test_triplet_all_many_positives(backend, device, n_classes):
    """Anchors with many positives take the sort-based path of the triplet kernel."""
    B = 48
    x = torch.randn(B, 6, dtype=torch.float64)
    y = torch.arange(B) % n_classes
    loss = LOSS_BY_NAME["triplet_all"]
    for margin in (0.05, 0.5, 2.5):
        out, g = run(loss, backend, device, x, y, params=dict(margin=margin))
        exp, eg = run_reference(loss, x, y, params=dict(margin=margin))
        assert_tight(out, exp, rtol=1e-9)
        assert_tight(g[0], eg[0], rtol=1e-9)


def test_auto_uses_the_compiled_kernel_on_cpu(monkeypatch):
    """backend="auto" must not fall back to the reference when the CPU kernel exists."""
    assert _registry.resolve("pairwise_loss", "auto", torch.device("cpu")) == "cpu"

    def boom(*a, **k):
        raise AssertionError("reference called")

    for lo in LOSSES:
        monkeypatch.setattr(ref, lo.rfn.__name__, boom)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    for lo in LOSSES:
        lo.fn(x, y, **lo.kw)


def test_unified_module():
    x = torch.randn(20, 8)
    y = torch.randint(0, 5, (20,))
    mod = slf.UnifiedLoss(m=0.2, gamma=32, reduction="sum")
    assert torch.allclose(mod(x, y), slf.unified_loss(x, y, m=0.2, gamma=32, reduction="sum"))
    assert "gamma=32" in repr(mod)


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
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(rx=torch.randn(5, 3)), ValueError, "ref_embeddings and ref_labels must be given together"),
        (dict(rx=torch.randn(5, 2), ry=torch.zeros(5, dtype=torch.long)), ValueError, "embedding size"),
        (dict(rx=torch.randn(5, 3), ry=torch.zeros(4, dtype=torch.long)), ValueError, "ref_labels must have one entry"),
        (dict(ref_self_index=1), ValueError, "ref_self_index needs ref_embeddings"),
        (dict(rx=torch.randn(5, 3), ry=torch.zeros(5, dtype=torch.long), ref_self_index=5), ValueError,
         r"ref_self_index must be in \[0, 5\)"),
    ],
)
@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_bad_input_raises_clear_error(kwargs, exc, match, loss):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.randn(4, 3))
    y = kwargs.pop("y", torch.zeros(4, dtype=torch.long))
    rx = kwargs.pop("rx", None)
    ry = kwargs.pop("ry", None)
    with pytest.raises(exc, match=match):
        loss.fn(x, y, ref_embeddings=rx, ref_labels=ry, **loss.kw, **kwargs)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("circle", dict(gamma=-1.0), "gamma must be > 0"), ("circle", dict(gamma=0.0), "gamma must be > 0"),
        ("circle", dict(gamma=float("inf")), "gamma must be finite"), ("circle", dict(m=1.0), "m must be < 1"),
        ("circle", dict(m=-0.1), "m must be >= 0"), ("unified", dict(gamma=-2.0), "gamma must be > 0"),
        ("multi_similarity", dict(alpha=0.0), "alpha must be > 0"),
        ("multi_similarity", dict(beta=-1.0), "beta must be > 0"),
        ("multi_similarity", dict(base=float("nan")), "base must be finite"),
        ("supcon", dict(temperature=0.0), "temperature must be > 0"),
        ("ntxent", dict(temperature=-0.1), "temperature must be > 0"),
        ("contrastive", dict(neg_margin=float("inf")), "neg_margin must be finite"),
        ("triplet_all", dict(margin=float("nan")), "margin must be finite"),
        ("triplet_all", dict(mining="semihard"), "mining must be 'all' or 'batch_hard'"),
        ("generalized_lifted_structure", dict(neg_margin=float("nan")), "neg_margin must be finite"),
        ("tuplet_margin", dict(scale=0.0), "scale must be > 0"),
        ("tuplet_margin", dict(margin=5.73), "radians.*takes degrees"),
        ("tuplet_margin", dict(margin=-0.1), "margin must be >= 0"),
        ("margin", dict(beta=float("inf")), "beta must be finite"),
        ("margin", dict(margin=float("nan")), "margin must be finite"),
        ("margin", dict(beta=torch.ones(2, 2)), "beta must be a number, a one-element tensor"),
        ("margin", dict(beta=torch.ones(3, dtype=torch.long)), "beta must be float"),
        ("fastap", dict(num_bins=0), "num_bins must be a positive int"),
        ("fastap", dict(num_bins=2.5), "num_bins must be a positive int"),
    ],
)
def test_bad_parameters(name, params, match):
    loss = LOSS_BY_NAME[name]
    kw = {**loss.kw, **params}
    with pytest.raises((ValueError, TypeError), match=match):
        loss.fn(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **kw)


def test_unavailable_backend_raises():
    x = torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(slf.BackendUnavailable, match="cuda"):
        slf.circle_loss(x, y, backend="cuda")
    if can_run("triton", "pairwise_loss"):
        with pytest.raises(slf.BackendUnavailable, match="all triplets"):
            slf.triplet_margin_loss(x.to(triton_device()), y.to(triton_device()), backend="triton")


def test_triton_takes_any_embedding_size():
    """The table tiles D: an embedding wider than any one tile (on a GPU 2049, past every entry's
    tile; under the interpreter, whose tiles are 16 wide, 33) runs, and matches the reference.
    (tests/test_triton_build.py checks that the GPU table covers every D.)"""
    if not can_run("triton", "pairwise_loss"):
        pytest.skip("triton unavailable")
    from structloss_fast.pairwise import _triton as tk

    x = torch.randn(5, 2049 if torch.cuda.is_available() else 33, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2])
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert tk.check_supported(x.to(triton_device(), dtype), ops.LOSSES["circle"]) is None
    out, grads = run(LOSS_BY_NAME["circle"], "triton", triton_device(), x, y)
    expected, expected_grads = run_reference(LOSS_BY_NAME["circle"], x, y)
    assert_tight(out, expected, rtol=1e-9, what="loss")
    assert_tight(grads[0], expected_grads[0], rtol=1e-9, what="grad")


# ---------------------------------------------------------------- property-based


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def pairwise_problem(draw, max_b=40, losses=tuple(LOSSES)):
    B = draw(st.integers(1, max_b))
    D = draw(st.integers(1, 12))
    n_classes = draw(st.integers(1, B))
    labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=B, max_size=B))
    with_refs = draw(st.booleans())
    M = draw(st.integers(0, 30)) if with_refs else 0
    ref_labels = draw(st.lists(st.integers(0, n_classes), min_size=M, max_size=M))
    self_index = draw(st.one_of(st.none(), st.integers(0, max(M - 1, 0)))) if with_refs and M > 0 else None
    seed = draw(st.integers(0, 2**31 - 1))
    loss = draw(st.sampled_from(list(losses)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    setting = draw(st.sampled_from(["default", "other"]))
    return B, D, labels, with_refs, M, ref_labels, self_index, seed, loss, reduction, setting


def _check_problem(problem, backend, device):
    B, D, labels, with_refs, M, ref_labels, self_index, seed, loss, reduction, setting = problem
    params = loss.params if setting == "default" else loss.other
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, dtype=torch.float64, generator=g)
    y = torch.tensor(labels)
    rx = torch.randn(M, D, dtype=torch.float64, generator=g) if with_refs else None
    ry = torch.tensor(ref_labels, dtype=torch.long) if with_refs else None
    kw = dict(reduction=reduction)
    if self_index is not None:
        kw["ref_self_index"] = self_index
    out, grads = run(loss, backend, device, x, y, rx, ry, params=params, **kw)
    exp, exp_grads = run_reference(loss, x, y, rx, ry, params=params, **kw)
    assert_tight(out, exp, rtol=1e-9, atol=1e-10, what="loss")
    # The gradient of a row is its gradient on the unit sphere projected and divided by the row's
    # norm, so rounding in the (unprojected, loss-sized) sphere gradient is amplified by 1/|x_i|:
    # random rows of tiny norm (D = 1, |x_i| ~ 1e-5) get a per-row absolute tolerance to match.
    sphere_scale = 1.0 + exp.abs().sum().item()
    for a, b, t in zip(grads, exp_grads, [x] + ([rx] if with_refs else [])):
        row_atol = 1e-10 + 1e-13 * sphere_scale / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
        scale = b.abs().max().item() if b.numel() else 0.0
        bad = (a - b).abs() > row_atol + 1e-8 * scale
        assert not bad.any(), f"grad: error {(a - b).abs().max():.3e} (scale {scale:.3e}) at rows {bad.any(1).nonzero().flatten().tolist()}"


@settings(max_examples=200, deadline=None)
@given(pairwise_problem())
def test_property_cpu_matches_reference(problem):
    _check_problem(problem, "cpu", torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(pairwise_problem())
def test_property_cpu_sparse_accumulation_matches_reference(problem):
    import os

    old = os.environ.get(SPARSE_ENV)
    os.environ[SPARSE_ENV] = "1"
    try:
        _check_problem(problem, "cpu", torch.device("cpu"))
    finally:
        if old is None:
            del os.environ[SPARSE_ENV]
        else:
            os.environ[SPARSE_ENV] = old


@settings(max_examples=60, deadline=None)
@given(pairwise_problem())
def test_property_aten_epilogue_matches_reference(problem):
    _check_problem(problem, "aten", torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(pairwise_problem(max_b=16, losses=tuple(lo for lo in LOSSES if supported("triton", lo))))
def test_property_triton_matches_reference(problem):
    if not can_run("triton", "pairwise_loss"):
        pytest.skip("triton unavailable")
    _check_problem(problem, "triton", triton_device())

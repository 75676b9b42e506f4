"""What the pairwise losses ported from pytorch-metric-learning add beyond the shared tests of
test_losses.py (which run generalized lifted structure, tuplet margin, margin and FastAP through
every backend, dtype, reduction and PML parity): MarginLoss's learned and class-specific beta on
the op with per-anchor parameters, NPairsLoss on the fused linear kernels, and their edge cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _registry
from structloss_fast._ids import PAIR_LOSSES_WITH_ROW_PARAMS, PairLoss
from structloss_fast.pairwise import _ops as ops
from structloss_fast.pairwise import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, max_abs
from tests.pairwise.test_losses import aten_epilogue, labels_pattern

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

PATTERNS = ["random", "singletons", "one_class", "all_distinct", "two_views"]


def _grads(out, inputs):
    gs = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


# ---------------------------------------------------------------- MarginLoss: beta


@pytest.mark.parametrize("num_classes", [None, 5])
@pytest.mark.parametrize("nu", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["cpu", "aten", "reference"])
@pytest.mark.parametrize("labels", ["random", "one_class", "singletons"])
def test_margin_learned_beta_matches_pml(num_classes, nu, backend, labels):
    """learn_beta (one beta or one per class) with the regularizer: loss and the gradients of the
    embeddings and of beta equal PML's (float64); "one_class" has no triplet at all,
    "singletons" anchors without positives."""
    B, D = 30, 7
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = {"random": torch.randint(0, 5, (B,)), "one_class": torch.full((B,), 3),
         "singletons": torch.tensor([0, 1, 2] + [4] * (B - 3))}[labels]
    ours = slf.MarginLoss(margin=0.15, nu=nu, beta=1.0, learn_beta=True, num_classes=num_classes,
                          backend="cpu" if backend == "aten" else backend).double()
    theirs = pml_losses.MarginLoss(margin=0.15, nu=nu, beta=1.0, learn_beta=True, num_classes=num_classes)
    with torch.no_grad():  # distinct betas per class
        b = 0.9 + 0.3 * torch.rand(ours.beta.shape, dtype=torch.float64)
        ours.beta.copy_(b)
        theirs.beta.data = b.clone()
    if backend == "aten":
        with aten_epilogue():
            out = ours(x, y)
            gx, gb = _grads(out, [x, ours.beta])
    else:
        out = ours(x, y)
        gx, gb = _grads(out, [x, ours.beta])
    expected = theirs(x, y)
    ex, eb = _grads(expected, [x, theirs.beta])
    assert_tight(out.detach(), expected.detach(), what="loss")
    assert_tight(gx, ex, rtol=1e-9, atol=1e-12, what="d/dx")
    assert_tight(gb, eb.to(gb.dtype), rtol=1e-9, atol=1e-12, what="d/dbeta")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_class", [False, True])
def test_margin_gradcheck_embeddings_references_and_beta(reduction, per_class):
    """float64 gradcheck of margin_based_loss through the rowparam op, in the embeddings, the
    references and beta (relu kinks are measure zero for random inputs)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    r = torch.randn(6, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 2, 0, 2])
    ry = torch.tensor([0, 1, 2, 2, 1, 0])
    beta = (torch.tensor([0.9, 1.1, 1.3], dtype=torch.float64) if per_class
            else torch.tensor([1.05], dtype=torch.float64)).requires_grad_(True)

    def f(x, r, beta):
        return slf.margin_based_loss(x, y, beta=beta, nu=0.2, margin=0.3, ref_embeddings=r, ref_labels=ry,
                                     reduction=reduction)

    assert torch.autograd.gradcheck(f, (x, r, beta))
    assert torch.autograd.gradcheck(lambda x, beta: slf.margin_based_loss(x, y, beta=beta, reduction=reduction),
                                    (x, beta))


def test_margin_module_state_and_options():
    """PML keeps a fixed beta as a plain attribute (not in the state_dict) and a learned one as
    the Parameter `beta`: the Modules load each other's state_dicts."""
    fixed = slf.MarginLoss()
    assert "beta" not in fixed.state_dict() and not fixed.beta.requires_grad
    assert fixed.beta.shape == (1,) and fixed.beta.item() == pytest.approx(1.2)
    learned = slf.MarginLoss(learn_beta=True, num_classes=4, beta=0.7)
    assert isinstance(learned.beta, torch.nn.Parameter) and learned.beta.shape == (4,)
    theirs = pml_losses.MarginLoss(learn_beta=True, num_classes=4, beta=0.7)
    learned.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(learned.state_dict())
    assert fixed.state_dict().keys() == pml_losses.MarginLoss().state_dict().keys()
    assert "margin=0.2" in repr(fixed)
    with pytest.raises(ValueError, match="triplets_per_anchor must be 'all'"):
        slf.MarginLoss(triplets_per_anchor=100)
    with pytest.raises(ValueError, match="num_classes must be None or a positive int"):
        slf.MarginLoss(num_classes=0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\)"):
        learned(x, y)


def test_margin_beta_regularizer_needs_a_learned_beta():
    """As PML: nu adds nu * beta only when beta is learned."""
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    fixed = slf.MarginLoss(nu=0.5)
    base = fixed(x, y)
    assert torch.equal(base, slf.margin_based_loss(x, y, beta=fixed.beta, nu=0.0))
    learned = slf.MarginLoss(nu=0.5, learn_beta=True).double()(x, y)
    assert torch.allclose(learned - base, torch.tensor(0.5 * 1.2, dtype=torch.float64))


def test_margin_beta_follows_the_module_device_and_dtype():
    mod = slf.MarginLoss(num_classes=3).double()
    assert mod.beta.dtype == torch.float64
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    assert slf.MarginLoss(num_classes=3)(x, y).dtype == torch.float32


@pytest.mark.parametrize("grad_mode", [0, 1, 2])
@pytest.mark.parametrize("ref_is_x", [True, False])
def test_opcheck_rowparam_op(grad_mode, ref_is_x):
    if ref_is_x and grad_mode == 2:
        pytest.skip("kGradXRef needs references")
    B, M, D = 9, 7, 5
    x = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1).requires_grad_(True)
    y = torch.randint(0, 3, (B,))
    if ref_is_x:
        r, ry, so = x, y, 0
    else:
        r = F.normalize(torch.randn(M, D, dtype=torch.float64), dim=1).requires_grad_(True)
        ry, so = torch.randint(0, 3, (M,)), 2
    beta = (1.0 + 0.1 * torch.randn(B, dtype=torch.float64)).requires_grad_(True)
    loss_id = int(PairLoss.MARGIN_ALL)
    args = (x, y, r, ry, beta, so, ref_is_x, loss_id, [0.2], grad_mode)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_rowparam.default, args)
    with aten_epilogue():
        torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_rowparam.default, args)
    stats = torch.ops.structloss_fast.pairwise_loss_rowparam(*args)[0].detach()
    w = torch.randn(B, 1, dtype=torch.float64)
    bargs = (x.detach(), y, r.detach(), ry, beta.detach(), stats, w, so, ref_is_x, loss_id, [0.2], not ref_is_x)
    torch.library.opcheck(torch.ops.structloss_fast.pairwise_loss_rowparam_backward.default, bargs)


def test_row_parameter_losses_are_the_rowparam_ops():
    """_ids.PAIR_LOSSES_WITH_ROW_PARAMS equals the C++ pair_loss_has_row_params: each op refuses
    the other's losses."""
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    y = torch.randint(0, 2, (6,))
    beta = torch.ones(6, dtype=torch.float64)
    for loss in PairLoss:
        params = [0.5] * ops.PAIR_LOSS_INFO[loss].params
        if loss == PairLoss.FAST_AP:
            params = [4.0]
        if loss in PAIR_LOSSES_WITH_ROW_PARAMS:
            torch.ops.structloss_fast.pairwise_loss_rowparam(x, y, x, y, beta, 0, True, int(loss), params, 0)
            with pytest.raises(RuntimeError, match="takes a parameter per anchor"):
                torch.ops.structloss_fast.pairwise_loss(x, y, x, y, 0, True, int(loss), params, 0)
        else:
            torch.ops.structloss_fast.pairwise_loss(x, y, x, y, 0, True, int(loss), params, 0)
            with pytest.raises(RuntimeError, match="takes no per-anchor parameters"):
                torch.ops.structloss_fast.pairwise_loss_rowparam(x, y, x, y, beta, 0, True, int(loss), params, 0)


def test_rowparam_op_is_declared_cpu_only():
    """No CUDA or Triton kernel: "auto" on CUDA tensors runs the O(B M) reference."""
    spec = _registry.op(ops.ROWPARAM_OP)
    assert spec.kernels == ("cpu",)
    assert spec.candidates("cuda") == ()
    with pytest.raises(slf.BackendUnavailable, match="no triton kernel"):
        slf.margin_based_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), backend="triton")


def test_margin_matches_explicit_triplets():
    """The anchors' |N| sum_P + |P| sum_N form equals the sum over every explicit triplet."""
    x = torch.randn(15, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (15,))
    d = ref.distance_from_similarity(ref.cosine_similarity(x, x))
    pos, neg = ref.pair_masks(y, y, torch.arange(15))
    beta, margin = 1.1, 0.3
    t = torch.relu(d[:, :, None] - beta + margin) + torch.relu(beta - d[:, None, :] + margin)
    valid = pos[:, :, None] & neg[:, None, :]
    parts = ((torch.relu(d[:, :, None] - beta + margin) > 0) & valid).sum() + \
        ((torch.relu(beta - d[:, None, :] + margin) > 0) & valid).sum()
    expected = (t * valid).sum() / parts
    assert_tight(slf.margin_based_loss(x, y, beta=beta, margin=margin), expected)


# ---------------------------------------------------------------- NPairsLoss


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("B", [1, 2, 5, 40])
def test_npairs_matches_pml(backend, pattern, B):
    x = torch.randn(B, 9, dtype=torch.float64, requires_grad=True)
    y = labels_pattern(pattern, B)
    y = y[torch.randperm(B)]  # anchors are not in label order
    expected = pml_losses.NPairsLoss()(x, y)
    (ge,) = _grads(expected, [x])
    out = slf.NPairsLoss(backend=backend)(x, y)
    (g,) = _grads(out, [x])
    assert_tight(out.detach(), expected.detach(), what="loss")
    assert_tight(g, ge, rtol=1e-9, atol=1e-12, what="grad")


def test_npairs_pairs_are_pml_pairs():
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    for _ in range(5):
        y = torch.randint(0, 7, (30,))
        a, p = ref.npairs_pairs(y)
        ea, ep = lmu.convert_to_pos_pairs_with_unique_labels(None, y)
        assert torch.equal(a, ea) and torch.equal(p, ep)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_npairs_reductions_and_gradcheck(reduction):
    x = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, 1, 3, 0, 1, 3, 2, 5, 5, 0, 4])
    out, exp = slf.npairs_loss(x, y, reduction=reduction), ref.npairs_loss(x, y, reduction=reduction)
    assert out.shape == exp.shape == ((11,) if reduction == "none" else ())
    assert_tight(out.detach(), exp.detach())
    assert torch.autograd.gradcheck(lambda x: slf.npairs_loss(x, y, reduction=reduction), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_npairs_low_precision(dtype):
    x = torch.randn(64, 16, dtype=torch.float64)
    y = torch.arange(64) // 3
    xt = x.clone().requires_grad_(True)
    t = ref.npairs_loss(xt, y)
    tg, = _grads(t, [xt])
    xl = x.to(dtype).requires_grad_(True)
    low = ref.npairs_loss(xl, y)
    lg, = _grads(low, [xl])
    xo = x.to(dtype).requires_grad_(True)
    out = slf.npairs_loss(xo, y)
    og, = _grads(out, [xo])
    assert out.dtype == dtype and og.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_close_to_truth(out, t, low, floor=floor, what="loss")
    assert_close_to_truth(og, tg, lg, floor=floor * tg.abs().max().item(), what="grad")


def test_npairs_edge_cases_and_bad_input():
    x = torch.randn(5, 3, requires_grad=True)
    out = slf.npairs_loss(x, torch.arange(5))  # no class with two samples: 0, still connected
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert slf.npairs_loss(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0
    assert torch.equal(slf.npairs_loss(torch.randn(4, 3), torch.arange(4), reduction="none"), torch.zeros(4))
    xn = torch.randn(6, 3)
    xn[0, 0] = float("nan")
    assert torch.isnan(slf.npairs_loss(xn, torch.tensor([0, 0, 1, 1, 2, 2])))
    mod = slf.NPairsLoss()
    with pytest.raises(ValueError, match="takes no ref_emb"):
        mod(x, torch.zeros(5, dtype=torch.long), ref_emb=x, ref_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        mod(x, torch.zeros(5, dtype=torch.long), indices_tuple=(torch.tensor([0]),) * 3)
    with pytest.raises(ValueError, match="labels must have one entry per row"):
        slf.npairs_loss(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(slf.BackendUnavailable):
        slf.npairs_loss(x, torch.zeros(5, dtype=torch.long), backend="cuda")


def test_npairs_never_uses_the_reference(monkeypatch):
    monkeypatch.setattr(ref, "npairs_loss", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reference")))
    slf.npairs_loss(torch.randn(10, 4), torch.arange(10) // 2)


# ---------------------------------------------------------------- tuplet margin, FastAP: edge cases


@pytest.mark.parametrize("backend", ["cpu", "aten", "reference"])
def test_tuplet_identical_positives_have_finite_gradients(backend):
    """A positive pair at angle 0 (acos's derivative is infinite there; PML's gradient is NaN):
    the derivative of cos(theta - m) in s is taken as cos m, finite, on every backend alike."""
    x = torch.randn(6, 4, dtype=torch.float64)
    x[1] = x[0]
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    xd = x.clone().requires_grad_(True)
    if backend == "aten":
        with aten_epilogue():
            out = slf.tuplet_margin_loss(xd, y, backend="cpu")
    else:
        out = slf.tuplet_margin_loss(xd, y, backend=backend)
    (g,) = _grads(out, [xd])
    assert torch.isfinite(out) and torch.isfinite(g).all()
    xr = x.clone().requires_grad_(True)
    (gr,) = _grads(ref.tuplet_margin_loss(xr, y), [xr])
    assert_tight(g, gr, rtol=1e-9, atol=1e-12)


def test_tuplet_margin_module_takes_radians():
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,))
    assert torch.allclose(slf.TupletMarginLoss(margin=math.radians(10.0), scale=32)(x, y),
                          pml_losses.TupletMarginLoss(margin=10.0, scale=32)(x, y), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="10.0 degrees is margin=0.174533"):
        slf.TupletMarginLoss(margin=10.0)


@pytest.mark.parametrize("num_bins", [1, 3, 10, 40])
def test_fastap_bins_match_pml(num_bins):
    x = torch.randn(32, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    expected = pml_losses.FastAPLoss(num_bins=num_bins)(x, y)
    (ge,) = _grads(expected, [x])
    out = slf.FastAPLoss(num_bins=num_bins)(x, y)
    (g,) = _grads(out, [x])
    assert_tight(out.detach(), expected.detach())
    assert_tight(g, ge, rtol=1e-9, atol=1e-12)


def test_fastap_anchor_without_positives_is_not_counted():
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # anchors 5 and 6 have no positive
    rows = slf.fastap_loss(x, y, reduction="none")
    assert rows[5] == 0 and rows[6] == 0
    assert_tight(slf.fastap_loss(x, y), rows[:5].mean())
    assert max_abs(slf.fastap_loss(x, y, backend="reference"), slf.fastap_loss(x, y)) < 1e-14


@pytest.mark.parametrize("backend", ["cpu", "aten"])
def test_fastap_self_slot_with_another_label_is_a_negative(backend):
    """With ref_self_index, an anchor's own slot is left out of its positives only: a slot whose
    stored label differs is one of its negatives (hypothesis found the kernel dropping it)."""
    x = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    rx, ry = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([0, 1])
    kw = dict(ref_embeddings=rx, ref_labels=ry, ref_self_index=0, reduction="none")
    if backend == "aten":
        with aten_epilogue():
            out = slf.fastap_loss(x, y, backend="cpu", **kw)
    else:
        out = slf.fastap_loss(x, y, backend="cpu", **kw)
    assert_tight(out, slf.fastap_loss(x, y, backend="reference", **kw))

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
    xh = ref.normalize(x)
    d = ref.euclidean_distance(xh, xh, xh @ xh.T)
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
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] must index \[0, 5\)"):
        mod(x, torch.zeros(5, dtype=torch.long), indices_tuple=(torch.tensor([0]), torch.tensor([7]), torch.tensor([1])))
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


# ---------------------------------------------------------------- PML's keywords on the ported losses

PR = pytest.importorskip("pytorch_metric_learning.reducers")
PD = pytest.importorskip("pytorch_metric_learning.distances")
PM = pytest.importorskip("pytorch_metric_learning.miners")

# name -> (ours(**kw), PML's(**kw)), with settings other than the defaults
PORTED = {
    "generalized_lifted_structure": (lambda **k: slf.GeneralizedLiftedStructureLoss(neg_margin=0.8, pos_margin=0.1, **k),
                                     lambda **k: pml_losses.GeneralizedLiftedStructureLoss(neg_margin=0.8,
                                                                                           pos_margin=0.1, **k)),
    "tuplet_margin": (lambda **k: slf.TupletMarginLoss(margin=math.radians(10.0), scale=32, **k),
                      lambda **k: pml_losses.TupletMarginLoss(margin=10.0, scale=32, **k)),
    "margin": (lambda **k: slf.MarginLoss(margin=0.1, beta=0.9, **k),
               lambda **k: pml_losses.MarginLoss(margin=0.1, beta=0.9, **k)),
    "fastap": (lambda **k: slf.FastAPLoss(num_bins=5, **k), lambda **k: pml_losses.FastAPLoss(num_bins=5, **k)),
    "npairs": (lambda **k: slf.NPairsLoss(**k), lambda **k: pml_losses.NPairsLoss(**k)),
}
# PML keeps the per-anchor (lifted structure) and per-pair (tuplet) losses as (K, 1), which its
# ClassWeightedReducer broadcasts into K x K and its PerAnchorReducer refuses; ours weights each
# element by its anchor's class (the other pairwise losses do the same, docs/pairwise.md).
COLUMN_LOSSES = {"generalized_lifted_structure", "tuplet_margin"}


def _batch(B=40, classes=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 8, generator=g, dtype=dtype), torch.randint(0, classes, (B,), generator=g)


def _same(ours, theirs, *inputs, rtol=1e-9, atol=1e-11):
    """Loss and the gradients of every input (float64) equal PML's."""
    xs = [t.clone().requires_grad_() for t in inputs]
    ps = [t.clone().requires_grad_() for t in inputs]
    a, b = ours(*xs), theirs(*ps)
    ga = _grads(a, xs)
    gb = _grads(b, ps)
    torch.testing.assert_close(a.detach(), b.detach().to(a.dtype).reshape(a.shape), rtol=rtol, atol=atol)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol * max(v.abs().max().item(), 1.0))
    return a


MINERS = {"pairs": lambda: PM.MultiSimilarityMiner(0.1), "pair_margin": lambda: PM.PairMarginMiner(0.3, 0.9),
          "triplets": lambda: PM.TripletMarginMiner(0.3), "batch_hard": lambda: PM.BatchHardMiner()}


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_take_pml_miners_tuples(name, miner):
    """A PML miner's pairs or triplets, read as each PML class reads them (pairs, a mask of pairs,
    triplets crossed, FastAP's anchor weights, NPairs' first pair per label)."""
    ours, theirs = PORTED[name]
    x, y = _batch()
    t = MINERS[miner]()(x, y)
    _same(lambda e: ours()(e, y, t), lambda e: theirs()(e, y, t), x)


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_take_our_miners_and_edge_tuples(name):
    ours, theirs = PORTED[name]
    x, y = _batch(16)
    mined = slf.MultiSimilarityMiner(0.1)(x, y)  # PML's pairs, ordered by reference within an anchor
    _same(lambda e: ours()(e, y, mined), lambda e: theirs()(e, y, tuple(mined.value())), x)
    empty = torch.empty(0, dtype=torch.long)
    for t in [(empty,) * 4, (empty,) * 3, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])),
              (torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2]), torch.tensor([0, 1, 1]), torch.tensor([3, 3, 4]))]:
        if name == "generalized_lifted_structure" and len(t) == 4 and t[0].numel() == 3:
            continue  # (0, 1) both positive and negative: an error for PML's mat-based losses (and ours)
        _same(lambda e: ours()(e, y, t), lambda e: theirs()(e, y, t), x)


@pytest.mark.parametrize("name", ["generalized_lifted_structure", "tuplet_margin", "margin"])
def test_ported_losses_take_a_tuple_with_references(name):
    ours, theirs = PORTED[name]
    x, y = _batch(24)
    r, ry = _batch(40, seed=1)
    t = PM.MultiSimilarityMiner(0.2)(x, y, r, ry)
    _same(lambda e, f: ours()(e, y, t, f, ry), lambda e, f: theirs()(e, y, t, f, ry), x, r)


def test_fastap_and_npairs_take_no_references_with_a_tuple():
    x, y = _batch(12)
    t = PM.MultiSimilarityMiner(0.2)(x, y)
    with pytest.raises(ValueError, match="takes no references"):
        slf.fastap_loss(x, y, indices_tuple=t, ref_embeddings=x, ref_labels=y)
    with pytest.raises(ValueError, match="takes no ref_emb"):
        slf.NPairsLoss()(x, y, t, x, y)
    with pytest.raises(ValueError, match="labels are needed"):
        slf.NPairsLoss()(x, None, t)


REDUCERS = {
    "mean": lambda R: R.MeanReducer(), "sum": lambda R: R.SumReducer(), "avg_non_zero": lambda R: R.AvgNonZeroReducer(),
    "threshold": lambda R: R.ThresholdReducer(0.1, 3.0), "threshold_high": lambda R: R.ThresholdReducer(high=0.5),
    "per_anchor": lambda R: R.PerAnchorReducer(),
    "class_weighted": lambda R: R.ClassWeightedReducer(torch.linspace(0.1, 1.0, 6, dtype=torch.float64)),
    "divisor": lambda R: R.DivisorReducer(),
}


@pytest.mark.parametrize("mined", [False, True])
@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_take_pml_reducers(name, reducer, mined):
    ours, theirs = PORTED[name]
    x, y = _batch()
    t = PM.MultiSimilarityMiner(0.1)(x, y) if mined else None
    if reducer == "divisor" and name != "margin":
        with pytest.raises(ValueError, match="supplies a divisor"):
            ours(reducer=slf.DivisorReducer())(x, y, t)
        return
    if reducer == "per_anchor" and name == "margin":
        with pytest.raises(NotImplementedError, match="triplet reduction"):
            ours(reducer=slf.PerAnchorReducer())(x, y, t)
        return
    if name in COLUMN_LOSSES and reducer in ("class_weighted", "per_anchor"):
        elements = lambda e: theirs(reducer=PR.DoNothingReducer())(e, y, t)["loss"]
        if reducer == "class_weighted":
            w = REDUCERS[reducer](PR).weights

            def expected(e):
                info = elements(e)
                anchors = info["indices"] if info["reduction_type"] == "element" else info["indices"][0]
                return (info["losses"].reshape(-1) * w[y[anchors]]).mean()
        else:
            def expected(e):  # per anchor, the mean of its pair losses; then their mean
                info = elements(e)
                if info["reduction_type"] == "element":
                    return info["losses"].reshape(-1).mean()
                a = info["indices"][0]
                sums = torch.zeros(len(y), dtype=e.dtype).index_add(0, a, info["losses"].reshape(-1))
                n = torch.zeros(len(y), dtype=e.dtype).index_add(0, a, torch.ones(len(a), dtype=e.dtype))
                return torch.where(n > 0, sums / n.clamp_min(1), torch.zeros_like(n)).mean()
        _same(lambda e: ours(reducer=REDUCERS[reducer](slf))(e, y, t), expected, x)
        return
    for objects in (slf, PR):
        _same(lambda e: ours(reducer=REDUCERS[reducer](objects))(e, y, t),
              lambda e: theirs(reducer=REDUCERS[reducer](PR))(e, y, t), x)


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_do_nothing_reducer_returns_pml_elements(name):
    ours, theirs = PORTED[name]
    x, y = _batch(24)
    a = ours(reducer=slf.DoNothingReducer())(x, y)
    b = theirs(reducer=PR.DoNothingReducer())(x, y)
    assert set(a) == set(b)
    for k in b:
        assert a[k]["reduction_type"] == b[k]["reduction_type"]
        la, lb = a[k]["losses"], b[k]["losses"]
        if torch.is_tensor(lb):
            torch.testing.assert_close(la.reshape(-1).sort().values, lb.reshape(-1).sort().values)
        else:
            assert la == lb


DISTANCES = {
    "generalized_lifted_structure": [lambda D: D.CosineSimilarity(), lambda D: D.LpDistance(power=2),
                                     lambda D: D.LpDistance(p=1), lambda D: D.DotProductSimilarity(normalize_embeddings=False)],
    "margin": [lambda D: D.CosineSimilarity(), lambda D: D.LpDistance(power=2, normalize_embeddings=False),
               lambda D: D.LpDistance(p=1)],
    "fastap": [lambda D: D.LpDistance(), lambda D: D.LpDistance(power=3)],
    "npairs": [lambda D: D.LpDistance(), lambda D: D.LpDistance(p=1, power=2),
               lambda D: D.DotProductSimilarity(normalize_embeddings=False)],
}


@pytest.mark.parametrize("name, k", [(n, k) for n, ds in DISTANCES.items() for k in range(len(ds))])
def test_ported_losses_take_pml_distances(name, k):
    ours, theirs = PORTED[name]
    make = DISTANCES[name][k]
    x, y = _batch(32)
    t = PM.TripletMarginMiner(0.4)(x, y)
    for objects in (slf, PD):
        _same(lambda e: ours(distance=make(objects))(e, y), lambda e: theirs(distance=make(PD))(e, y), x)
    _same(lambda e: ours(distance=make(slf))(e, y, t), lambda e: theirs(distance=make(PD))(e, y, t), x)
    # the engine kernels of these losses compute their default distance only: an explicit
    # compiled backend says so rather than running another distance
    with pytest.raises(slf.BackendUnavailable, match="default distance only|engine computes"):
        ours(distance=make(slf), backend="cpu")(x, y)


def test_ported_losses_refuse_distances_pml_refuses():
    x, y = _batch(8)
    with pytest.raises(ValueError, match="takes distance=CosineSimilarity only"):
        slf.TupletMarginLoss(distance=slf.LpDistance())(x, y)
    with pytest.raises(ValueError, match="takes distance=LpDistance only"):
        slf.FastAPLoss(distance=slf.CosineSimilarity())(x, y)
    with pytest.raises(ValueError, match="p=2 only"):
        slf.FastAPLoss(distance=PD.LpDistance(p=1))(x, y)
    with pytest.raises(ValueError, match="normalize_embeddings=True only"):
        slf.FastAPLoss(distance=slf.LpDistance(normalize_embeddings=False))(x, y)


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_take_pml_embedding_regularizer(name):
    PG = pytest.importorskip("pytorch_metric_learning.regularizers")
    ours, theirs = PORTED[name]
    x, y = _batch(24)
    _same(lambda e: ours(embedding_regularizer=slf.LpRegularizer(), embedding_reg_weight=0.3)(e, y),
          lambda e: theirs(embedding_regularizer=PG.LpRegularizer(), embedding_reg_weight=0.3)(e, y), x)


@pytest.mark.parametrize("num_classes", [None, 6])
@pytest.mark.parametrize("case", ["tuple", "mean", "threshold", "cosine", "sum", "divisor"])
def test_margin_learned_beta_with_pml_keywords(case, num_classes):
    """beta (one or per class) and nu's regularizer on every path: the listed triplets (a tuple,
    a reducer needing elements, another distance) and the engine (SumReducer, DivisorReducer)."""
    x, y = _batch(30)
    t = PM.TripletMarginMiner(0.3)(x, y) if case == "tuple" else None
    kw = {"mean": dict(reducer="MeanReducer"), "threshold": dict(reducer="ThresholdReducer"),
          "cosine": dict(distance="CosineSimilarity"), "sum": dict(reducer="SumReducer"),
          "divisor": dict(reducer="DivisorReducer")}.get(case, {})

    def make(cls, objs):
        args = {}
        if "reducer" in kw:
            r = getattr(objs[0], kw["reducer"])
            args["reducer"] = r(low=0.05) if kw["reducer"] == "ThresholdReducer" else r()
        if "distance" in kw:
            args["distance"] = getattr(objs[1], kw["distance"])()
        return cls(margin=0.15, nu=0.3, beta=1.0, learn_beta=True, num_classes=num_classes, **args)

    ours = make(slf.MarginLoss, (slf, slf)).double()
    theirs = make(pml_losses.MarginLoss, (PR, PD))
    b = 0.9 + 0.3 * torch.rand(ours.beta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours.beta.copy_(b)
    theirs.beta.data = b.clone()
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(xo, y, t), theirs(xp, y, t)
    gx, gb = _grads(out, [xo, ours.beta])
    ex, eb = _grads(expected, [xp, theirs.beta])
    assert_tight(out.detach(), expected.detach(), what="loss")
    assert_tight(gx, ex, rtol=1e-9, atol=1e-12, what="d/dx")
    assert_tight(gb, eb.to(gb.dtype), rtol=1e-9, atol=1e-12, what="d/dbeta")
    assert gb.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_losses_default_call_stays_on_the_fused_engine(name, monkeypatch):
    """The default call, SumReducer and the default reducer never list pairs."""
    from structloss_fast.pairwise import tuples

    monkeypatch.setattr(tuples, "element_losses", lambda *a, **k: (_ for _ in ()).throw(AssertionError("listed")))
    ours, theirs = PORTED[name]
    x, y = _batch(24)
    default = {"margin": slf.DivisorReducer}.get(name, slf.MeanReducer)
    for kw in ({}, dict(reduction="sum"), dict(reducer=slf.SumReducer()), dict(reducer=default())):
        _same(lambda e: ours(backend="cpu", **kw)(e, y),
              lambda e: theirs(reducer=PR.SumReducer() if kw.get("reduction") == "sum" else kw.get("reducer") and
                               getattr(PR, type(kw["reducer"]).__name__)())(e, y), x)

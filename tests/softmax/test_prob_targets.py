"""Class-probability targets for encouraging_loss and EncouragingLoss (F.cross_entropy's second
target form: mixup, distillation): every backend against F.cross_entropy at bonus_weight=0 (with
class weights, label smoothing, every reduction, (C,) and (N, C, d1, ...) inputs), against the
reference with the bonus, gradients in the logits and in the targets, confident rows in low
precision, custom-op registration, edge cases and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast.softmax import _ops as ops
from tests.helpers import assert_close_to_truth, assert_tight, can_run, fast_backends, triton_device

BACKENDS = fast_backends("softmax_loss")
ALL = [("reference", torch.device("cpu"))] + BACKENDS
ALL_IDS = [f"{b}-{d.type}" for b, d in ALL]


def soft_targets(shape, gen, dtype=torch.float64, sharp=1.0):
    """Random distributions along dim 1 (the class dimension)."""
    return torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * sharp, dim=1 if len(shape) > 1
                         else 0).to(dtype)


def run(x, t, backend, device, *, seed=3, **kw):
    """Loss, and the gradients in the logits and the targets of a randomly weighted output."""
    xd = x.detach().to(device).requires_grad_(True)
    td = t.detach().to(device).requires_grad_(True)
    out = slf.encouraging_loss(xd, td, backend=backend, **kw)
    v = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gx, gt = torch.autograd.grad((out * v.to(device, out.dtype)).sum(), (xd, td))
    return out.detach().cpu(), gx.cpu(), gt.cpu()


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(9, 7), (7,), (3, 5, 2, 2)], ids=["NC", "C", "NCd1d2"])
@pytest.mark.parametrize("opts", [dict(), dict(weight=True, label_smoothing=0.2)], ids=["plain", "weight-ls"])
def test_bonus_weight_zero_is_cross_entropy(backend, device, reduction, shape, opts):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    t = soft_targets(shape, gen)
    C = shape[0] if len(shape) == 1 else shape[1]
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if opts.get("weight") else None
    ls = opts.get("label_smoothing", 0.0)
    xa, ta = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    expected = F.cross_entropy(xa, ta, weight=w, label_smoothing=ls, reduction=reduction)
    v = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ex, et = torch.autograd.grad((expected * v).sum(), (xa, ta))
    out, gx, gt = run(x, t, backend, device, bonus_weight=0.0, label_smoothing=ls, reduction=reduction,
                      weight=None if w is None else w.to(device))
    assert out.shape == expected.shape
    assert_tight(out, expected.detach(), what="loss")
    assert_tight(gx, ex, rtol=1e-9, what="logits grad")
    assert_tight(gt, et, rtol=1e-9, what="target grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=ALL_IDS[1:])
@pytest.mark.parametrize("log_end", [1.0, 0.6])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_matches_reference_with_the_bonus(backend, device, log_end, reduction):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 37, generator=gen, dtype=torch.float64) * 3
    x[0, 5] += 30  # confident rows: one class holds p close to 1 (its q from the others' sum)
    x[1, 0] += 30
    t = soft_targets((11, 37), gen, sharp=3.0)
    w = torch.rand(37, generator=gen, dtype=torch.float64) + 0.5
    kw = dict(log_end=log_end, bonus_weight=1.3, label_smoothing=0.1, weight=w, reduction=reduction)
    expected = run(x, t, "reference", torch.device("cpu"), **kw)
    got = run(x, t, backend, device, **{**kw, "weight": w.to(device)})
    for g, e, what in zip(got, expected, ("loss", "logits grad", "target grad")):
        assert_tight(g, e, rtol=1e-9, what=what)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_2x_torch_error(backend, device, dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(24, 29, generator=gen, dtype=torch.float64) * 3)
    x[0, 3] += 20  # a confident row
    t = soft_targets((24, 29), gen, sharp=2.0)
    xl, tl = x.to(dtype), t.to(dtype)
    truth = slf.encouraging_loss(xl.double(), tl.double(), backend="reference", reduction="none")
    torch_low = slf.encouraging_loss(xl, tl, backend="reference", reduction="none")
    out = slf.encouraging_loss(xl.to(device), tl.to(device), backend=backend, reduction="none")
    assert out.dtype == dtype
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert_close_to_truth(out.cpu(), truth, torch_low, floor=4 * ulp * truth.abs().max().item(), what="loss")
    # The confident row's gradient: its largest class's -q is kept (not rounded to 0 - 0).
    xd = xl.to(device).requires_grad_(True)
    g, = torch.autograd.grad(slf.encouraging_loss(xd, tl.to(device), backend=backend, reduction="sum"), xd)
    xt = xl.double().requires_grad_(True)
    gt, = torch.autograd.grad(slf.encouraging_loss(xt, tl.double(), backend="reference", reduction="sum"), xt)
    torch.testing.assert_close(g.double().cpu()[0], gt[0], rtol=0.02, atol=4 * ulp)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 5, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_(True)
    t = soft_targets((4, 5), gen).to(device).requires_grad_(True)
    w = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def fn(x, t):
        return slf.encouraging_loss(x, t, weight=w, label_smoothing=0.1, log_end=0.5, bonus_weight=0.8,
                                    reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (x, t), fast_mode=backend == "triton")


def test_module_takes_probabilities():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen)
    t = soft_targets((6, 4), gen, dtype=torch.float32)
    w = torch.rand(4, generator=gen) + 0.5
    mod = slf.EncouragingLoss(w, bonus_weight=0.5, label_smoothing=0.1)
    torch.testing.assert_close(mod(x, t), slf.encouraging_loss(x, t, weight=w, bonus_weight=0.5, label_smoothing=0.1))
    # mixup: a blend of one-hot targets is a blend of the two class-index losses
    y1, y2 = torch.randint(0, 4, (6,), generator=gen), torch.randint(0, 4, (6,), generator=gen)
    lam = 0.3
    mixed = lam * F.one_hot(y1, 4).float() + (1 - lam) * F.one_hot(y2, 4).float()
    plain = slf.EncouragingLoss(bonus_weight=0.5)
    torch.testing.assert_close(plain(x, mixed), lam * plain(x, y1) + (1 - lam) * plain(x, y2))


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_layouts_and_edge_cases(backend, device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    t = soft_targets((7, 5), gen)
    expected = slf.encouraging_loss(x, t, backend="reference", reduction="none")
    xt = x.T.contiguous().T  # transposed storage
    tt = t.T.contiguous().T
    torch.testing.assert_close(slf.encouraging_loss(xt.to(device), tt.to(device), backend=backend,
                                                    reduction="none").cpu(), expected)
    one = slf.encouraging_loss(x[:1].expand(3, 5).to(device), t[:1].expand(3, 5).to(device), backend=backend,
                               reduction="none")
    torch.testing.assert_close(one.cpu(), expected[:1].expand(3))
    empty = slf.encouraging_loss(x[:0].to(device), t[:0].to(device), backend=backend)
    assert empty.item() == 0.0  # (the package's mean of nothing; F.cross_entropy gives NaN)
    bad = x.clone()
    bad[2, 1] = float("nan")
    nan_rows = slf.encouraging_loss(bad.to(device), t.to(device), backend=backend, reduction="none").cpu()
    assert torch.isnan(nan_rows[2]) and torch.isfinite(nan_rows[[0, 1, 3, 4, 5, 6]]).all()


def test_opcheck_probability_targets():
    x = (torch.randn(6, 9, dtype=torch.float64) * 2).requires_grad_(True)
    t = soft_targets((6, 9), torch.Generator().manual_seed(7)).requires_grad_(True)
    w = torch.rand(9, dtype=torch.float64) + 0.5
    params = ops.make_params(0.75, 1.0, 0.1, 1e-5)
    ops_to_check = [(torch.ops.structloss_fast.softmax_loss, torch.ops.structloss_fast.softmax_loss_backward)]
    if can_run("triton", "softmax_loss"):
        ops_to_check.append((torch.ops.structloss_fast.softmax_loss_triton,
                             torch.ops.structloss_fast.softmax_loss_backward_triton))
    dev = triton_device()
    for fwd, bwd in ops_to_check:
        d = dev if fwd is not ops_to_check[0][0] else torch.device("cpu")
        args = (x.to(d), t.to(d), w.to(d), -100, 0, params, False)
        torch.library.opcheck(fwd.default, args)
        stats = fwd(*args)[0].detach()
        torch.library.opcheck(bwd.default, (x.detach().to(d), t.detach().to(d), w.to(d), stats,
                                            torch.randn(6, dtype=torch.float64, device=d), -100, 0, params))


def test_compiled_op_refuses_a_margin_transform_with_probabilities():
    x, t = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError, match="class-probability targets take no margin transform"):
        torch.ops.structloss_fast.softmax_loss(x, t, None, -100, 2, ops.make_params(1.0, 0.0, 0.0, 1e-5, 4.0, 0.2),
                                               False)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(t=torch.rand(4, 3)), ValueError, "class-probability targets .* must have input's shape"),
    (dict(t=torch.rand(5)), ValueError, "class-probability targets .* must have input's shape"),
    (dict(weight=torch.ones(3)), ValueError, "weight must have one entry per class"),
])
def test_bad_input(kwargs, exc, match):
    x = torch.randn(4, 5)
    t = kwargs.pop("t", torch.softmax(torch.randn(4, 5), 1))
    with pytest.raises(exc, match=match):
        slf.encouraging_loss(x, t, **kwargs)

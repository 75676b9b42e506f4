"""The fused linear Encouraging Loss (chunked rows and class tiles, no (N, C) logits) against the
dense definition, F.linear_cross_entropy at bonus_weight=0, gradients, opcheck, edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _ext
from structloss_fast.softmax import _ops as ops
from structloss_fast.softmax import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, can_run, fast_backends, triton_device

BACKENDS = fast_backends("linear_softmax_loss")
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]


def problem(N=13, H=6, C=37, dtype=torch.float64, seed=0, bias=True, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(C, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, C, (N,), generator=g)
    if ignore and N > 3:
        y[3] = -100
    return x, W, b, y


def run(fn, x, W, b, y, device, seed=5, **kw):
    leaves = [t.detach().to(device).requires_grad_(True) for t in (x, W)]
    bd = None if b is None else b.detach().to(device).requires_grad_(True)
    loss = fn(leaves[0], leaves[1], y.to(device), bd, **kw)
    v = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    targets = leaves + ([bd] if bd is not None else [])
    grads = torch.autograd.grad((loss * v.to(device=device, dtype=loss.dtype)).sum(), targets)
    return loss.detach().cpu(), [g.cpu() for g in grads]


def fused(backend):
    return lambda x, W, y, b, **kw: slf.linear_encouraging_loss(x, W, y, b, backend=backend, **kw)


def dense(x, W, y, b, **kw):
    kw.pop("chunk_rows", None)
    kw.pop("class_tile", None)
    return ref.linear_encouraging_loss(x, W, y, b, **kw)


CHUNKINGS = [(0, 0), (4, 0), (5, 7), (13, 36), (1, 1)]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("chunk_rows,class_tile", CHUNKINGS, ids=[f"r{r}-t{t}" for r, t in CHUNKINGS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, log_end=0.5, weighted=True)], ids=["el", "ls-w"])
def test_fused_matches_dense_float64(backend, device, chunk_rows, class_tile, reduction, opts):
    """Loss and gradients of input, weight and bias, for row chunks and class tiles (an online
    log-sum-exp across tiles; the Triton path chunks rows only)."""
    if backend == "triton" and (class_tile or reduction == "sum"):
        pytest.skip("Triton: row chunks only; a subset under the interpreter")
    opts = dict(opts)
    x, W, b, y = problem()
    if opts.pop("weighted", False):
        opts["weight"] = torch.rand(W.shape[0], dtype=torch.float64) + 0.2
    kw = dict(reduction=reduction, **opts)
    out, g = run(fused(backend), x, W, b, y, device, chunk_rows=chunk_rows, class_tile=class_tile,
                 **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
    exp, eg = run(dense, x, W, b, y, torch.device("cpu"), **kw)
    assert_tight(out, exp, what="loss")
    for name, a, e in zip(("input", "weight", "bias"), g, eg):
        assert_tight(a, e, rtol=1e-9, what=f"d/d{name}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True), (False, False, True)])
def test_partial_requires_grad_and_no_bias(backend, device, requires):
    x, W, b, y = problem(bias=True)
    ts = [t.to(device).requires_grad_(r) for t, r in zip((x, W, b), requires)]
    loss = slf.linear_encouraging_loss(ts[0], ts[1], y.to(device), ts[2], backend=backend)
    wanted = [t for t in ts if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted)
    rs = [t.detach().clone().requires_grad_(r) for t, r in zip((x, W, b), requires)]
    expected = ref.linear_encouraging_loss(rs[0], rs[1], y, rs[2])
    egrads = torch.autograd.grad(expected, [t for t in rs if t.requires_grad])
    for a, e in zip(grads, egrads):
        assert_tight(a.cpu(), e, rtol=1e-9)
    out, g = run(fused(backend), x, W, None, y, device)
    exp, eg = run(dense, x, W, None, y, torch.device("cpu"))
    assert len(g) == 2
    assert_tight(out, exp)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, weighted=True)], ids=["ce", "ce-ls-w"])
def test_bonus_weight_zero_is_linear_cross_entropy(backend, device, reduction, opts):
    """At bonus_weight=0 the fused loss is torch's F.linear_cross_entropy (dense path, and the
    chunked path where it supports the options)."""
    opts = dict(opts)
    x, W, b, y = problem()
    if opts.pop("weighted", False):
        opts["weight"] = torch.rand(W.shape[0], dtype=torch.float64) + 0.2
    xa, Wa, ba = (t.clone().requires_grad_(True) for t in (x, W, b))
    expected = F.linear_cross_entropy(xa, Wa, y, linear_bias=ba, reduction=reduction, **opts)
    v = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eg = torch.autograd.grad((expected * v).sum(), [xa, Wa, ba])
    out, g = run(fused(backend), x, W, b, y, device, bonus_weight=0.0, reduction=reduction,
                 **{k: (t.to(device) if torch.is_tensor(t) else t) for k, t in opts.items()})
    assert_tight(out, expected.detach(), what="loss")
    for a, e in zip(g, eg):
        assert_tight(a, e, rtol=1e-9, what="grad")
    if not opts:
        chunked = F.linear_cross_entropy(x, W, y, linear_bias=b, reduction=reduction,
                                         options=torch.nn.LinearCrossEntropyOptions())
        assert_tight(out, chunked, what="chunked torch")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_float32(backend, device, dtype):
    """Inputs in float32 / bfloat16: loss and gradients within 2x the error of the dense
    PyTorch version in that dtype (the fused path keeps logits and gradient sums in float32)."""
    x, W, b, y = problem(N=48, H=16, C=75)
    xl, Wl, bl = (t.to(dtype) for t in (x, W, b))
    truth, tg = run(dense, xl.double(), Wl.double(), bl.double(), y, torch.device("cpu"), label_smoothing=0.1)
    low, lg = run(dense, xl, Wl, bl, y, torch.device("cpu"), label_smoothing=0.1)
    out, g = run(fused(backend), xl, Wl, bl, y, device, label_smoothing=0.1, chunk_rows=16)
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
    assert_close_to_truth(out, truth, low, floor=2 * ulp * truth.abs().item(), what="loss")
    for name, a, e, lo in zip(("input", "weight", "bias"), g, tg, lg):
        assert_close_to_truth(a, e, lo, floor=2 * ulp * e.abs().max().item(), what=name)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_gradcheck_float64(backend, device):
    x, W, b, y = problem(N=5, H=3, C=7)
    args = tuple(t.to(device).requires_grad_(True) for t in (x, W, b))
    yd = y.to(device)
    for reduction in ("mean", "none"):
        def fn(x, W, b):
            return slf.linear_encouraging_loss(x, W, yd, b, reduction=reduction, label_smoothing=0.1,
                                               backend=backend, chunk_rows=2)

        assert torch.autograd.gradcheck(fn, args, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_retain_graph(backend, device):
    x, W, b, y = problem()
    ts = [t.to(device).requires_grad_(True) for t in (x, W, b)]
    loss = slf.linear_encouraging_loss(ts[0], ts[1], y.to(device), ts[2], backend=backend)
    g1 = torch.autograd.grad(loss, ts, retain_graph=True)
    g2 = torch.autograd.grad(loss, ts)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def _op_args(device, grad_mask=(True, True, True), bias=True, transform=0):
    x, W, b, y = problem(N=7, H=4, C=9, bias=bias)
    if transform:
        x, W = F.normalize(x, dim=1), F.normalize(W, dim=1)
    x, W = x.to(device).requires_grad_(True), W.to(device).requires_grad_(True)
    b = None if b is None else b.to(device).requires_grad_(True)
    cw = (torch.rand(9, dtype=torch.float64) + 0.5).to(device)
    return (x, W, b, y.to(device), cw, -100, transform, ops.make_params(0.75, 1.0, 0.1, 1e-5, 10.0, 0.3),
            list(grad_mask), 3, 0)


LINEAR_OPCHECK = [((True, True, True), True, 0), ((False, False, False), True, 0),
                  ((False, True, False), False, 2), ((True, True, False), False, 4)]


@pytest.mark.skipif(not _ext.has_kernel("linear_softmax_loss", "CPU"), reason="extension not built")
@pytest.mark.parametrize("grad_mask,bias,transform", LINEAR_OPCHECK)
def test_opcheck_compiled(grad_mask, bias, transform):
    args = _op_args("cpu", grad_mask, bias, transform)
    torch.library.opcheck(torch.ops.structloss_fast.linear_softmax_loss.default, args)
    x, W, b, y, cw, ii, tr, params, _, rc, ct = args
    stats = torch.ops.structloss_fast.linear_softmax_loss(x, W, b, y, cw, ii, tr, params, [False] * 3, rc, ct)[0]
    rw = torch.randn(x.shape[0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.structloss_fast.linear_softmax_loss_backward.default,
                          (x.detach(), W.detach(), None if b is None else b.detach(), y, cw, stats.detach(), rw, ii, tr,
                           params, [True, True, b is not None], rc, 2))


@pytest.mark.parametrize("grad_mask,bias,transform", LINEAR_OPCHECK[:2])
def test_opcheck_triton(grad_mask, bias, transform):
    if not can_run("triton", "linear_softmax_loss"):
        pytest.skip("triton unavailable")
    args = _op_args(triton_device(), grad_mask, bias, transform)
    torch.library.opcheck(torch.ops.structloss_fast.linear_softmax_loss_triton.default, args)


@pytest.mark.skipif(not _ext.has_kernel("linear_softmax_loss", "CPU"), reason="extension not built")
def test_torch_compile_fullgraph():
    x, W, b, y = problem(dtype=torch.float32)

    def step(x, W, b):
        return slf.linear_encouraging_loss(x, W, y, b, label_smoothing=0.1, chunk_rows=4)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ts = [t.clone().requires_grad_(True) for t in (x, W, b)]
    out = compiled(*ts)
    g = torch.autograd.grad(out, ts)
    ts2 = [t.clone().requires_grad_(True) for t in (x, W, b)]
    expected = step(*ts2)
    eg = torch.autograd.grad(expected, ts2)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    for a, e in zip(g, eg):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_edge_cases(backend, device):
    # Empty batch; a single unbatched row; one class; all rows ignored.
    x, W, b, y = problem(N=0)
    xd = x.to(device).requires_grad_(True)
    loss = slf.linear_encouraging_loss(xd, W.to(device), y.to(device), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert xd.grad.shape == (0, 6)
    x, W, b, y = problem(N=1)
    out = slf.linear_encouraging_loss(x[0].to(device), W.to(device), y[0].to(device), b.to(device),
                                      reduction="none", backend=backend)
    assert out.shape == ()
    assert_tight(out.cpu(), ref.linear_encouraging_loss(x[0], W, y[0], b, reduction="none"))
    x, W, b, y = problem(C=1, ignore=False)
    out, g = run(fused(backend), x, W, b, y, device)
    exp, eg = run(dense, x, W, b, y, torch.device("cpu"))
    assert_tight(out, exp)
    assert all(torch.count_nonzero(t) == 0 for t in g)
    x, W, b, y = problem()
    y[:] = -100
    out, g = run(fused(backend), x, W, b, y, device)
    assert out.item() == 0.0 and all(torch.count_nonzero(t) == 0 for t in g)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(W=torch.randn(7, 5)), ValueError, r"linear_weight must be \(C, H\) with H=4"),
        (dict(W=torch.zeros(7, 4, dtype=torch.int64)), TypeError, "linear_weight must be float16"),
        (dict(b=torch.randn(6)), ValueError, r"linear_bias must be \(7,\)"),
        (dict(y=torch.tensor([0, 7, 1])), ValueError, r"target must hold class indices in \[0, 7\)"),
        (dict(y=torch.zeros(2, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(x=torch.randn(3, 2, 4)), ValueError, r"target must have shape \(3, 2\)"),
        (dict(x=torch.randn(())), ValueError, r"input must be \(\.\.\., H\)"),
        (dict(log_end=2.0), ValueError, "log_end must be <= 1"),
        (dict(eps=-1.0), ValueError, "eps must be > 0"),
        (dict(chunk_rows=-1), ValueError, "chunk_rows must be an int >= 0"),
        (dict(weight=torch.ones(3)), ValueError, "weight must have one entry per class"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, match):
    x = kwargs.pop("x", torch.randn(3, 4))
    W = kwargs.pop("W", torch.randn(7, 4))
    b = kwargs.pop("b", None)
    y = kwargs.pop("y", torch.zeros(3, dtype=torch.long))
    with pytest.raises(exc, match=match):
        slf.linear_encouraging_loss(x, W, y, b, **kwargs)


def test_module():
    torch.manual_seed(0)
    head = slf.LinearEncouragingLoss(8, 11, log_end=0.5)
    x = torch.randn(5, 8)
    y = torch.randint(0, 11, (5,))
    loss = head(x, y)
    expected = ref.encouraging_loss(head.logits(x), y, log_end=0.5)
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()
    assert head.linear_weight.grad is not None and head.linear_bias.grad is not None
    assert "num_classes=11" in repr(head)

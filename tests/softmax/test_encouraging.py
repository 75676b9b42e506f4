"""Encouraging Loss on the row-softmax kernels: every backend against the reference (the spec's
definition), against an independent transcription of the authors' formula and, at
bonus_weight=0, against F.cross_entropy for every option; gradients, custom-op registration,
low precision with confident rows, edge cases and bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _ext, _registry
from structloss_fast.softmax import _ops as ops
from structloss_fast.softmax import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, can_run, fast_backends, triton_device

BACKENDS = fast_backends("softmax_loss")
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]
ALL = [("reference", torch.device("cpu"))] + BACKENDS
ALL_IDS = ["reference-cpu"] + BACKEND_IDS
CPU_ONLY = [(b, d) for b, d in BACKENDS if b == "cpu"]


def is_interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def run(x, y, backend, device, weight=None, seed=7, **kw):
    """Loss and input gradient of a randomly weighted sum of the output."""
    xd = x.detach().to(device).requires_grad_(True)
    w = None if weight is None else weight.to(device)
    loss = slf.encouraging_loss(xd, y.to(device), weight=w, backend=backend, **kw)
    v = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (g,) = torch.autograd.grad((loss * v.to(device=device, dtype=loss.dtype)).sum(), xd)
    return loss.detach().cpu(), g.cpu()


def logits_batch(N, C, dtype=torch.float64, scale=3.0, seed=0, confident=True, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    if confident and N >= 3 and C >= 3:
        x[0, y[0]] = x[0].max() + 12  # confident and right
        x[1, (y[1] + 1) % C] = x[1].max() + 12  # confident and wrong (the largest non-target class)
    if ignore and N >= 4:
        y[2] = -100
    return x, y


# ---------------------------------------------------------------- an independent transcription


def authors_el(logits, target, log_end=0.75, smoothing=0.0, reduction="mean"):
    """The authors' public EncouragingLoss / LabelSmoothingEncouragingLoss, written out from
    their formula (probs = exp(log_softmax), bonus = log(clamp(1 - probs, 1e-5)), tangent above
    log_end, loss = (bonus - logp)[target] mixed with the class mean)."""
    lprobs = F.log_softmax(logits, dim=-1)
    probs = torch.exp(lprobs)
    bonus = torch.log(torch.clamp(torch.ones_like(probs) - probs, min=1e-5))
    if log_end != 1.0:
        y_log_end = torch.log(torch.ones_like(probs) - log_end)
        after = 1 / (log_end - torch.ones_like(probs)) * (probs - log_end) + y_log_end
        bonus = torch.where(probs > log_end, after, bonus)
    el = (bonus - lprobs).gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    loss = (1 - smoothing) * el + smoothing * (bonus - lprobs).mean(dim=-1)
    return loss.mean() if reduction == "mean" else loss


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("log_end", [1.0, 0.75, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_authors_formula(backend, device, log_end, smoothing):
    x, y = logits_batch(9, 37, scale=1.5, confident=False, ignore=False)
    xa = x.clone().requires_grad_(True)
    expected = authors_el(xa, y, log_end, smoothing)
    (eg,) = torch.autograd.grad(expected, xa)
    xd = x.to(device).requires_grad_(True)
    out = slf.encouraging_loss(xd, y.to(device), log_end=log_end, label_smoothing=smoothing, backend=backend)
    (g,) = torch.autograd.grad(out, xd)
    assert_tight(out.cpu(), expected, what="loss")
    assert_tight(g.cpu(), eg, rtol=1e-9, what="grad")


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("log_end", [1.0, 0.75, 0.3])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_float64_matches_reference(backend, device, reduction, log_end, smoothing, weighted):
    if is_interpreted(backend, device) and (log_end == 0.3 or reduction == "sum"):
        pytest.skip("interpreter: a subset of the grid")
    N, C = (7, 45) if backend == "triton" else (23, 77)
    x, y = logits_batch(N, C)
    w = torch.rand(C, dtype=torch.float64) + 0.1 if weighted else None
    kw = dict(log_end=log_end, label_smoothing=smoothing, reduction=reduction, bonus_weight=0.8)
    out, g = run(x, y, backend, device, weight=w, **kw)
    exp, eg = run(x, y, "reference", torch.device("cpu"), weight=w, **kw)
    assert out.shape == exp.shape
    assert_tight(out, exp, what="loss")
    assert_tight(g, eg, rtol=1e-9, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_bonus_weight_and_eps(backend, device, rho, eps):
    x, y = logits_batch(6 if backend == "triton" else 16, 19)
    x[3, y[3]] = x[3].max() + 7  # 1 - p near 1e-3: between the two eps values
    kw = dict(bonus_weight=rho, eps=eps, log_end=1.0)
    out, g = run(x, y, backend, device, **kw)
    exp, eg = run(x, y, "reference", torch.device("cpu"), **kw)
    assert_tight(out, exp, what="loss")
    assert_tight(g, eg, rtol=1e-9, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("C", [1, 2, 3, 31, 100])
def test_class_counts(backend, device, C):
    """C = 1 (loss is the constant bonus, gradient 0), C = 2, and sizes that are not powers of two
    (several blocks of the row loops)."""
    N = 5 if backend == "triton" else 13
    x, y = logits_batch(N, C, confident=C >= 3, ignore=False)
    for kw in (dict(), dict(label_smoothing=0.2, log_end=1.0)):
        out, g = run(x, y, backend, device, reduction="none", **kw)
        exp, eg = run(x, y, "reference", torch.device("cpu"), reduction="none", **kw)
        assert_tight(out, exp, what=f"loss C={C}")
        assert_tight(g, eg, rtol=1e-9, what=f"grad C={C}")
    if C == 1:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_large_row_several_blocks(backend, device):
    """C above the CPU kernels' online-softmax block (1024) with the target in a late block."""
    if is_interpreted(backend, device):
        pytest.skip("interpreter: too slow for wide rows")
    x, y = logits_batch(6, 3000, dtype=torch.float64)
    y[4] = 2999
    for kw in (dict(), dict(label_smoothing=0.1, weight=torch.rand(3000, dtype=torch.float64))):
        out, g = run(x, y, backend, device, **kw)
        exp, eg = run(x, y, "reference", torch.device("cpu"), **kw)
        assert_tight(out, exp, what="loss")
        assert_tight(g, eg, rtol=1e-9, what="grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_float32_within_2x_torch_error(backend, device, scale):
    x, y = logits_batch(8 if backend == "triton" else 64, 53, scale=scale)
    for kw in (dict(), dict(label_smoothing=0.1, log_end=1.0)):
        truth, tg = run(x, y, "reference", torch.device("cpu"), **kw)
        t32, t32g = run(x.float(), y, "reference", torch.device("cpu"), **kw)
        out, g = run(x.float(), y, backend, device, **kw)
        assert out.dtype == torch.float32
        assert_close_to_truth(out, truth, t32, floor=1e-6 * max(1.0, truth.abs().item()), what="loss")
        assert_close_to_truth(g, tg, t32g, floor=1e-7 * tg.abs().max().item(), what="grad")


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("margin", [0.0, 10.0, 20.0])
@pytest.mark.parametrize("log_end", [1.0, 0.75])
def test_low_precision_confident_rows(backend, device, dtype, margin, log_end):
    """Logits in fp16/bf16 with target logit = row max + margin: the loss and the target gradient
    are computed in float32 from the stored logits and rounded once, so they stay accurate where
    PyTorch's own low-precision arithmetic (1 - p rounded to 0) loses them."""
    N, C = (6, 37) if backend == "triton" else (32, 101)
    x, y = logits_batch(N, C, scale=2.0, confident=False, ignore=False)
    if margin:
        rows = torch.arange(N)
        x[rows, y] = x.max(dim=1).values + margin
    xl = x.to(dtype)
    truth, tg = run(xl.double(), y, "reference", torch.device("cpu"), log_end=log_end)
    low, lg = run(xl, y, "reference", torch.device("cpu"), log_end=log_end)
    out, g = run(xl, y, backend, device, log_end=log_end)
    assert out.dtype == dtype and g.dtype == dtype
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert_close_to_truth(out, truth, low, floor=2 * ulp * max(1.0, truth.abs().item()), what="loss")
    assert_close_to_truth(g, tg, lg, floor=2 * ulp * tg.abs().max().item(), what="grad")
    # The target gradient on its own: within a couple of ulps of the truth, relative to itself
    # (plus the dtype's subnormal spacing, where the truth underflows).
    rows = torch.arange(N)
    gt, tt = g[rows, y].double(), tg[rows, y]
    spacing = torch.finfo(dtype).tiny * ulp
    assert ((gt - tt).abs() <= 2 * ulp * tt.abs() + spacing).all(), (gt, tt)
    if margin == 10.0 and log_end == 1.0:
        # rho = 1, LE = 1 and 1 - p ~ 1e-3 (above eps): d loss / d z_y = -1 (times the output
        # weight v / N) although p rounds to 1 in this dtype. (At margin 20, 1 - p < eps: the
        # clamp stops the bonus gradient and the target gradient is -(1 - p), as in the truth.)
        v = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(7)) / N
        assert torch.allclose(gt, -v.expand(N), rtol=4 * ulp)


# ---------------------------------------------------------------- bonus_weight = 0 is F.cross_entropy

CE_CASES = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, weight=True),
    dict(ignore=True),
    dict(ignore=True, weight=True, label_smoothing=0.2),
    dict(ignore_index=3, ignore=True),
    dict(ignore_index=3, ignore=True, weight=True, label_smoothing=0.05),
]


def _ce_inputs(shape, case, dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) * 2
    tshape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
    y = torch.randint(0, C, tshape, generator=gen)
    ii = case.get("ignore_index", -100)
    if case.get("ignore") and y.numel() > 2:
        flat = y.view(-1)
        flat[::3] = ii
    w = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) + 0.2 if case.get("weight") else None
    return x, y, w, dict(ignore_index=ii, label_smoothing=case.get("label_smoothing", 0.0))


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(17, 11), (11,), (4, 7, 3, 2)], ids=["NC", "C", "NCd1d2"])
def test_bonus_weight_zero_is_cross_entropy(backend, device, case, reduction, shape):
    if is_interpreted(backend, device) and (reduction == "sum" or (len(shape) != 2 and len(case) < 3)):
        pytest.skip("interpreter: a subset of the grid")
    x, y, w, kw = _ce_inputs(shape, case)
    xa = x.clone().requires_grad_(True)
    expected = F.cross_entropy(xa, y, weight=w, reduction=reduction, **kw)
    v = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (eg,) = torch.autograd.grad((expected * v).sum(), xa)
    xd = x.to(device).requires_grad_(True)
    out = slf.encouraging_loss(xd, y.to(device), bonus_weight=0.0, weight=None if w is None else w.to(device),
                               reduction=reduction, backend=backend, **kw)
    (g,) = torch.autograd.grad((out * v.to(device)).sum(), xd)
    assert out.shape == expected.shape
    assert_tight(out.cpu(), expected.detach(), what="loss")
    assert_tight(g.cpu(), eg, rtol=1e-9, what="grad")


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bonus_weight_zero_is_cross_entropy_low_precision(backend, device, dtype):
    x, y, w, kw = _ce_inputs((24, 29), dict(ignore=True, weight=True, label_smoothing=0.1), dtype=dtype)
    truth = F.cross_entropy(x.double(), y, weight=w.double(), **kw)
    torch_low = F.cross_entropy(x, y, weight=w, **kw)
    out = slf.encouraging_loss(x.to(device), y.to(device), bonus_weight=0.0, weight=w.to(device), backend=backend,
                               **kw)
    assert out.dtype == dtype
    ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
    assert_close_to_truth(out.cpu(), truth, torch_low, floor=4 * ulp * truth.abs().item(), what="loss")


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_all_targets_ignored(backend, device, reduction, smoothing):
    """No target counts: 0 for every reduction and a zero gradient. F.cross_entropy agrees for
    sum and none; for mean it returns NaN (0 / 0), where the spec asks for 0."""
    x = torch.randn(5, 7, dtype=torch.float64)
    y = torch.full((5,), -100)
    out, g = run(x, y, backend, device, reduction=reduction, label_smoothing=smoothing)
    assert torch.all(out == 0) and torch.count_nonzero(g) == 0
    ce = F.cross_entropy(x, y, reduction=reduction, label_smoothing=smoothing)
    if reduction == "mean":
        assert torch.isnan(ce)
    else:
        assert torch.equal(ce, out.to(ce.dtype))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(log_end=0.5, label_smoothing=0.2, weighted=True),
                                  dict(log_end=1.0, bonus_weight=2.0)], ids=["default", "ls-weight-le.5", "le1-rho2"])
def test_gradcheck_float64(backend, device, reduction, opts):
    opts = dict(opts)
    weighted = opts.pop("weighted", False)
    x = (torch.randn(5, 6, dtype=torch.float64) * 2).to(device).requires_grad_(True)
    y = torch.tensor([0, 3, -100, 5, 2]).to(device)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).to(device) if weighted else None

    def fn(x):
        return slf.encouraging_loss(x, y, weight=w, reduction=reduction, backend=backend, **opts)

    # Under the Triton interpreter every evaluation is slow: gradcheck's fast mode (a random
    # projection of the Jacobian) and one reduction.
    if is_interpreted(backend, device):
        if reduction != "none":
            pytest.skip("interpreter: one reduction")
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_and_forward_without_grad(backend, device, reduction):
    """The forward's gradient buffer is consumed by the first backward; a second backward through
    the same graph recomputes it from the saved statistics and gives the same result."""
    x, y = logits_batch(6, 23)
    xd = x.to(device).requires_grad_(True)
    loss = slf.encouraging_loss(xd, y.to(device), reduction=reduction, label_smoothing=0.1, backend=backend)
    v = torch.randn(loss.shape, dtype=torch.float64).to(device)
    (g1,) = torch.autograd.grad((loss * v).sum(), xd, retain_graph=True)
    (g2,) = torch.autograd.grad((loss * v).sum(), xd)
    assert_tight(g2.cpu(), g1.cpu(), rtol=1e-12)
    _, eg = run(x, y, "reference", torch.device("cpu"), reduction=reduction, label_smoothing=0.1)
    with torch.no_grad():
        nograd = slf.encouraging_loss(xd, y.to(device), reduction=reduction, label_smoothing=0.1, backend=backend)
    assert_tight(nograd.cpu(), loss.detach().cpu())


# ---------------------------------------------------------------- custom-op registration


def _op_args(device, dtype=torch.float64, compute_grad=True, weighted=True, transform=0, ls=0.1):
    x = (torch.randn(6, 9, dtype=dtype) * 2).to(device).requires_grad_(True)
    y = torch.tensor([1, 0, -100, 8, 4, 4]).to(device)
    w = (torch.rand(9, dtype=dtype) + 0.5).to(device) if weighted else None
    if transform:
        x = (torch.rand(6, 9, dtype=dtype) * 2 - 1).to(device).requires_grad_(True)
    params = ops.make_params(0.75, 1.0, ls, 1e-5, 3.0, 0.3)
    return (x, y, w, -100, transform, params, compute_grad)


OPCHECK_CASES = [(True, True, 0), (True, False, 0), (False, True, 0), (True, False, 3), (True, False, 4)]


def opcheck_utils(compute_grad):
    """With compute_grad, the op's gradient output is the buffer that its backward scales in place
    (that is how no second N x C buffer is made), so eager outputs read after a backward differ
    from AOTAutograd's traced ones by design: test_aot_dispatch_dynamic is left out there (and
    runs for compute_grad=False); test_torch_compile_fullgraph checks compile end to end."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:3] if compute_grad else utils


@pytest.mark.skipif(not _ext.has_kernel("softmax_loss", "CPU"), reason="extension not built")
@pytest.mark.parametrize("compute_grad,weighted,transform", OPCHECK_CASES)
def test_opcheck_compiled(compute_grad, weighted, transform):
    args = _op_args("cpu", compute_grad=compute_grad, weighted=weighted, transform=transform)
    torch.library.opcheck(torch.ops.structloss_fast.softmax_loss.default, args, test_utils=opcheck_utils(compute_grad))
    x, y, w, ii, tr, params, _ = args
    stats = torch.ops.structloss_fast.softmax_loss(x, y, w, ii, tr, params, False)[0].detach()
    rw = torch.randn(x.shape[0], dtype=stats.dtype)
    torch.library.opcheck(torch.ops.structloss_fast.softmax_loss_backward.default,
                          (x.detach(), y, w, stats, rw, ii, tr, params))


@pytest.mark.parametrize("compute_grad,weighted,transform", OPCHECK_CASES[:3])
def test_opcheck_triton(compute_grad, weighted, transform):
    if not can_run("triton", "softmax_loss"):
        pytest.skip("triton unavailable")
    args = _op_args(triton_device(), compute_grad=compute_grad, weighted=weighted, transform=transform)
    torch.library.opcheck(torch.ops.structloss_fast.softmax_loss_triton.default, args,
                          test_utils=opcheck_utils(compute_grad))
    x, y, w, ii, tr, params, _ = args
    stats = torch.ops.structloss_fast.softmax_loss_triton(x, y, w, ii, tr, params, False)[0].detach()
    rw = torch.randn(x.shape[0], dtype=stats.dtype, device=x.device)
    torch.library.opcheck(torch.ops.structloss_fast.softmax_loss_backward_triton.default,
                          (x.detach(), y, w, stats, rw, ii, tr, params))


@pytest.mark.parametrize("backend,device", CPU_ONLY, ids=["cpu-cpu"])
def test_torch_compile_fullgraph(backend, device):
    def step(x, y, w):
        return (slf.encouraging_loss(x * 2.0, y, backend=backend, label_smoothing=0.1)
                + slf.encouraging_loss(x, y, weight=w, reduction="sum", log_end=1.0, backend=backend))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 10, requires_grad=True)
    y = torch.randint(0, 10, (16,))
    w = torch.rand(10)
    out = compiled(x, y, w)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    expected = step(x, y, w)
    expected.backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g, x.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, device, reduction):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss = slf.encouraging_loss(x, y, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
        loss.backward()
        assert x.grad is not None and x.grad.shape == (0, 8)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_and_target_dtypes(backend, device):
    base = torch.randn(30, 40, dtype=torch.float64)
    x = base[::2, 1::3]  # (15, 13), non-contiguous
    assert not x.is_contiguous()
    y = torch.randint(0, 13, (30,))[::2]
    expected, eg = run(x, y, "reference", torch.device("cpu"), label_smoothing=0.1)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        out, g = run(x, y.to(dtype), backend, device, label_smoothing=0.1)
        assert_tight(out, expected, what=str(dtype))
        assert_tight(g, eg, rtol=1e-9, what=str(dtype))
    # Channels-first input transposed in memory: (N, C, d) built from a (N, d, C) tensor.
    xk = torch.randn(3, 5, 9, dtype=torch.float64).transpose(1, 2)
    yk = torch.randint(0, 9, (3, 5))
    out, g = run(xk, yk, backend, device, reduction="none")
    exp, eg = run(xk, yk, "reference", torch.device("cpu"), reduction="none")
    assert out.shape == (3, 5)
    assert_tight(out, exp)
    assert_tight(g, eg, rtol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_rows_of_minus_inf_except_target(backend, device, smoothing):
    """A row whose only finite logit is the target: p = 1, the clamped / conservative bonus,
    zero gradient; with label smoothing the -inf classes give an infinite loss (as torch)."""
    x = torch.randn(4, 9, dtype=torch.float64)
    y = torch.tensor([2, 5, 0, 8])
    x[1] = float("-inf")
    x[1, 5] = 3.0
    for le in (1.0, 0.75):
        out, g = run(x, y, backend, device, reduction="none", log_end=le, label_smoothing=smoothing)
        exp, eg = run(x, y, "reference", torch.device("cpu"), reduction="none", log_end=le, label_smoothing=smoothing)
        if smoothing == 0:
            assert torch.isfinite(out).all()
            assert torch.count_nonzero(g[1]) == 0
            assert_tight(out, exp)
            assert_tight(g, eg, rtol=1e-9)
        else:
            assert out[1] == float("inf") and exp[1] == float("inf")
            assert_tight(out[[0, 2, 3]], exp[[0, 2, 3]])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["target", "other"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_non_finite_logits_give_non_finite_loss(backend, device, bad, where, smoothing):
    x = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    col = y[2] if where == "target" else (y[2] + 1) % 10
    x[2, col] = bad
    loss = slf.encouraging_loss(x.to(device), y.to(device), reduction="none", label_smoothing=smoothing,
                                backend=backend)
    exp = ref.encouraging_loss(x, y, reduction="none", label_smoothing=smoothing)
    if torch.isfinite(exp[2]):
        # -inf on a non-target class without smoothing is a legal logit (p = 0).
        assert torch.isfinite(loss[2]).item()
    else:
        assert not torch.isfinite(loss[2]).item()
    assert torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


@pytest.mark.skipif(not _ext.has_kernel("softmax_loss", "CPU"), reason="extension not built")
def test_cpu_is_deterministic_across_calls():
    x = torch.randn(300, 2500, requires_grad=True)
    y = torch.randint(0, 2500, (300,))
    l1 = slf.encouraging_loss(x, y, label_smoothing=0.1, backend="cpu")
    (g1,) = torch.autograd.grad(l1, x)
    l2 = slf.encouraging_loss(x, y, label_smoothing=0.1, backend="cpu")
    (g2,) = torch.autograd.grad(l2, x)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_auto_uses_the_compiled_kernel_on_cpu(monkeypatch):
    if not _ext.has_kernel("softmax_loss", "CPU"):
        pytest.skip("extension not built")
    assert _registry.resolve("softmax_loss", "auto", torch.device("cpu")) == "cpu"

    def boom(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(ref, "encouraging_loss", boom)
    monkeypatch.setattr(ref, "linear_encouraging_loss", boom)
    x = torch.randn(10, 4, requires_grad=True)
    slf.encouraging_loss(x, torch.randint(0, 4, (10,))).backward()
    slf.linear_encouraging_loss(x, torch.randn(5, 4), torch.randint(0, 5, (10,))).backward()


def test_module_matches_function_and_repr():
    x = torch.randn(20, 8)
    y = torch.randint(0, 8, (20,))
    w = torch.rand(8)
    mod = slf.EncouragingLoss(w, log_end=0.5, reduction="sum", label_smoothing=0.1)
    assert torch.allclose(mod(x, y), slf.encouraging_loss(x, y, weight=w, log_end=0.5, reduction="sum",
                                                          label_smoothing=0.1))
    assert "log_end=0.5" in repr(mod)
    assert "weight" in dict(mod.named_buffers())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(y=torch.tensor([0, 1, 5, 2])), ValueError, r"target must hold class indices in \[0, 5\)"),
        (dict(y=torch.tensor([0, -1, 2, 2])), ValueError, "target must hold class indices"),
        (dict(log_end=0.0), ValueError, "log_end must be > 0"),
        (dict(log_end=1.5), ValueError, "log_end must be <= 1"),
        (dict(eps=-1e-5), ValueError, "eps must be > 0"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(bonus_weight=-1.0), ValueError, "bonus_weight must be >= 0"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be <= 1"),
        (dict(bonus_weight=float("nan")), ValueError, "bonus_weight must be finite"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(y=torch.zeros(4, 2, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(y=torch.zeros(4)), ValueError, "class-probability targets .* must have input's shape"),
        (dict(y=torch.zeros(4, 5, dtype=torch.complex64)), TypeError, "target must hold integer class labels"),
        (dict(weight=torch.ones(5, requires_grad=True)), ValueError, "weight .* gets no gradient"),
        (dict(log_end=torch.tensor(0.5, requires_grad=True)), TypeError, "log_end is a constant of the loss"),
        (dict(bonus_weight=torch.ones(2)), TypeError, "bonus_weight must be a number or a 0-d real tensor"),
        (dict(x=torch.zeros(4, 5, dtype=torch.long)), TypeError, "input must be float16"),
        (dict(weight=torch.ones(4)), ValueError, "weight must have one entry per class"),
        (dict(weight=torch.ones(5, 1)), ValueError, "weight must be 1-D"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(y=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, match):
    x = kwargs.pop("x", torch.randn(4, 5))
    y = kwargs.pop("y", torch.zeros(4, dtype=torch.long))
    with pytest.raises(exc, match=match):
        slf.encouraging_loss(x, y, **kwargs)


@pytest.mark.skipif(not _ext.has_kernel("softmax_loss", "CPU"), reason="extension not built")
def test_compiled_op_checks_its_targets():
    """Called directly (no Python validation), the kernel still refuses an out-of-range target."""
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="out of range for 4 classes"):
        torch.ops.structloss_fast.softmax_loss(x, torch.tensor([0, 4, 1]), None, -100, 0,
                                               ops.make_params(0.75, 1.0, 0.0, 1e-5), False)


def test_unavailable_backend_raises():
    with pytest.raises(slf.BackendUnavailable, match="cuda"):
        slf.encouraging_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), backend="cuda")


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_target_dtype(backend, device, dtype):
    """Every backend takes what the kernels take: a uint8 target is class indices (the reference
    used to index with it as a boolean mask)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    expected = slf.encouraging_loss(x, y, backend="reference", reduction="none")
    out = slf.encouraging_loss(x.to(device), y.to(dtype).to(device), backend=backend, reduction="none")
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_numpy_and_tensor_options(backend, device):
    import numpy as np

    x = torch.randn(4, 5, dtype=torch.float64).to(device)
    y = torch.tensor([0, 1, 2, 4]).to(device)
    expected = slf.encouraging_loss(x, y, log_end=0.5, bonus_weight=0.5, label_smoothing=0.1, backend=backend)
    out = slf.encouraging_loss(x, y, log_end=np.float32(0.5), bonus_weight=torch.tensor(0.5),
                               label_smoothing=np.float64(0.1), ignore_index=np.int64(-100), backend=backend)
    torch.testing.assert_close(out, expected)

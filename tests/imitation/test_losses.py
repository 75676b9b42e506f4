"""Go Wide, Then Narrow: the layer-imitation loss (compiled CPU kernel against the reference, the
spec's definition) in every dtype, its gradients (gradcheck, exact double backward), the custom
ops' registration, memory, edge cases and bad input; the WideThenNarrow helper's adapters, merge
and stages; the digits example's quick mode and the docs' examples."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _ext
from tests.helpers import assert_close_to_truth, assert_tight, fast_backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OP = "layer_imitation_loss"
BACKENDS = fast_backends(OP, backends=("cpu",))
BACKEND_IDS = [b for b, _ in BACKENDS]
SHAPES = [(8, 16), (8, 4, 3, 3), (8, 40000), (1,)]  # the third spans several kernel spans
REDUCTION_SETS = ["mean", "sum", "batchmean", ["mean", "sum", "batchmean", "mean"]]


@pytest.fixture(autouse=True)
def _one_thread():
    """The networks and most tensors here are small: one thread (on a 2-core machine shared with
    other jobs, the thread pool's waits cost seconds per training test). The thread-count test
    sets its own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layers(shapes=SHAPES, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    student = [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]
    teacher = [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]
    return student, teacher


def weights_for(n):
    return [0.5 + 0.25 * i for i in range(n)]


def run(student, teacher, backend, *, per_layer=False, teacher_grad=False, seed=3, **kw):
    """The loss and the gradients of a random linear function of it wrt every input."""
    s = [t.detach().clone().requires_grad_(True) for t in student]
    t = [u.detach().clone().requires_grad_(teacher_grad) for u in teacher]
    out = slf.layer_imitation_loss(s, t, per_layer=per_layer, backend=backend, **kw)
    v = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad((out * v).sum(), s + (t if teacher_grad else []))
    return out.detach(), grads


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("reduction", REDUCTION_SETS, ids=str)
@pytest.mark.parametrize("per_layer", [False, True])
def test_float64_matches_reference(backend, reduction, per_layer):
    student, teacher = layers()
    kw = dict(weights=weights_for(len(student)), reduction=reduction)
    out, grads = run(student, teacher, backend, per_layer=per_layer, teacher_grad=True, **kw)
    ref_out, ref_grads = run(student, teacher, "reference", per_layer=per_layer, teacher_grad=True, **kw)
    assert out.shape == ref_out.shape and out.dtype == torch.float64
    assert_tight(out, ref_out, what="loss")
    for g, rg in zip(grads, ref_grads):
        assert_tight(g, rg, what="gradient")


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_float32_matches_reference(backend):
    student, teacher = layers(dtype=torch.float32)
    truth, truth_grads = run([s.double() for s in student], [t.double() for t in teacher], "reference",
                             per_layer=True, weights=weights_for(4))
    out, grads = run(student, teacher, backend, per_layer=True, weights=weights_for(4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), truth, rtol=2e-6, atol=0)
    for g, tg in zip(grads, truth_grads):
        torch.testing.assert_close(g.double(), tg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torch_error(backend, dtype):
    student, teacher = layers(dtype=dtype, scale=2.0)
    kw = dict(weights=weights_for(4), reduction=["mean", "sum", "batchmean", "mean"])
    truth, truth_grads = run([s.double() for s in student], [t.double() for t in teacher], "reference",
                             per_layer=True, **kw)
    same, same_grads = run(student, teacher, "reference", per_layer=True, **kw)
    out, grads = run(student, teacher, backend, per_layer=True, **kw)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_to_truth(out, truth, same, what=f"{dtype} loss")
    for i, (g, tg, sg) in enumerate(zip(grads, truth_grads, same_grads)):
        assert_close_to_truth(g, tg, sg, what=f"{dtype} gradient of layer {i}")


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_one_layer_is_mse_loss(backend):
    s, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for red in ("mean", "sum"):
        assert_tight(slf.layer_imitation_loss([s], [t], reduction=red, backend=backend),
                     F.mse_loss(s, t, reduction=red))
    assert_tight(slf.layer_imitation_loss([s], [t], reduction="batchmean", weights=[3.0], backend=backend),
                 3.0 * F.mse_loss(s, t, reduction="sum") / 7)


def test_module_form_matches_function():
    student, teacher = layers(dtype=torch.float32)
    mod = slf.LayerImitationLoss(weights_for(4), reduction="sum", per_layer=True)
    torch.testing.assert_close(mod(student, teacher),
                               slf.layer_imitation_loss(student, teacher, weights=weights_for(4), reduction="sum",
                                                        per_layer=True), rtol=0, atol=0)
    assert "per_layer=True" in repr(mod)


# ---------------------------------------------------------------- gradients and the custom ops


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("per_layer", [False, True])
def test_gradcheck_and_gradgradcheck(backend, per_layer):
    student, teacher = layers(shapes=[(3, 4), (2, 3, 2), (5,)])
    inputs = [u.requires_grad_(True) for u in student + teacher]

    def f(*xs):
        return slf.layer_imitation_loss(list(xs[:3]), list(xs[3:]), weights=[0.5, 2.0, 1.0],
                                        reduction=["mean", "batchmean", "sum"], per_layer=per_layer, backend=backend)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_backward_kernel_refuses_to_be_differentiated():
    s, t = torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(3, 2, dtype=torch.float64)
    coef = torch.ones(1, dtype=torch.float64, requires_grad=True)
    gs, _ = torch.ops.structloss_fast.layer_imitation_loss_backward([s], [t], coef, [True, False])
    with pytest.raises(RuntimeError, match="layer_imitation_loss"):
        gs[0].sum().backward()


@pytest.mark.skipif(not _ext.has_kernel(OP, "CPU"), reason="compiled op not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    student, teacher = layers(shapes=[(4, 3), (2, 2, 2)], dtype=dtype)
    op = torch.ops.structloss_fast.layer_imitation_loss.default
    torch.library.opcheck(op, ([s.requires_grad_(True) for s in student], teacher))
    torch.library.opcheck(op, (student, [t.requires_grad_(True) for t in teacher]))
    coef = torch.tensor([0.5, -1.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.structloss_fast.layer_imitation_loss_backward.default,
                          ([s.detach() for s in student], [t.detach() for t in teacher], coef, [True, True]))


@pytest.mark.skipif(not _ext.has_kernel(OP, "CPU"), reason="compiled op not built")
def test_forward_allocates_no_temporary():
    """One pass over all layers: the forward allocates its two small outputs and nothing of the
    inputs' size (the composite allocates a squared-error tensor per layer)."""
    from torch.profiler import ProfilerActivity, profile

    student, teacher = layers(shapes=[(64, 2048)] * 4, dtype=torch.float32)

    def allocated(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sum(max(e.cpu_memory_usage, 0) for e in prof.events())

    fused = allocated(lambda: slf.layer_imitation_loss(student, teacher))
    composite = allocated(lambda: sum(F.mse_loss(s, t) for s, t in zip(student, teacher)))
    assert composite >= 4 * student[0].nbytes  # the check sees temporaries
    assert fused < student[0].nbytes // 16, f"the fused forward allocated {fused} bytes"


@pytest.mark.skipif(not _ext.has_kernel(OP, "CPU"), reason="compiled op not built")
def test_result_does_not_depend_on_thread_count():
    student, teacher = layers(shapes=[(64, 20000), (3, 5)], dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(student, teacher, "cpu", per_layer=True, teacher_grad=True)
        torch.set_num_threads(2)
        two = run(student, teacher, "cpu", per_layer=True, teacher_grad=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1]))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", ["reference"] + BACKEND_IDS)
def test_empty_batch_gives_zero_and_empty_gradients(backend):
    s = [torch.randn(0, 5, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    t = [torch.randn(0, 5), s[1].detach().clone()]
    for red in ("mean", "sum", "batchmean"):
        out = slf.layer_imitation_loss(s, t, reduction=red, per_layer=True, backend=backend)
        assert torch.equal(out, torch.zeros(2))
        g = torch.autograd.grad(out.sum(), s)
        assert g[0].shape == (0, 5) and torch.equal(g[1], torch.zeros(4, 3))


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_non_contiguous_inputs_give_the_contiguous_result(backend):
    base_s, base_t = layers(shapes=[(6, 8), (5, 4, 3)])
    s = [base_s[0].t(), base_s[1].permute(2, 0, 1)]                       # transposed views
    t = [base_t[0].t(), base_t[1][:1].expand(5, 4, 3).permute(2, 0, 1)]  # an expanded teacher too
    s_c, t_c = [u.contiguous() for u in s], [u.contiguous() for u in t]
    kw = dict(weights=[1.0, 0.5], reduction=["mean", "batchmean"], per_layer=True)
    out, grads = run(s, t, backend, teacher_grad=True, **kw)
    out_c, grads_c = run(s_c, t_c, backend, teacher_grad=True, **kw)
    assert torch.equal(out, out_c)
    for g, gc in zip(grads, grads_c):
        assert torch.equal(g, gc)


@pytest.mark.parametrize("backend", ["reference"] + BACKEND_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(backend, bad):
    student, teacher = layers(shapes=[(4, 3), (2, 40000)], dtype=torch.float32)
    student[1][1, 30000] = bad  # in the second span of the second layer
    out = slf.layer_imitation_loss(student, teacher, per_layer=True, backend=backend)
    assert torch.isfinite(out[0]) and not torch.isfinite(out[1])
    assert not torch.isfinite(slf.layer_imitation_loss(student, teacher, backend=backend))


def test_zero_weight_layer_contributes_nothing():
    student, teacher = layers(shapes=[(4, 3), (5, 2)])
    full = slf.layer_imitation_loss(student, teacher, weights=[1.0, 0.0])
    assert_tight(full, F.mse_loss(student[0], teacher[0]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, exc, words", [
    (lambda s, t: ([s[0]], [t[0], t[1]]), ValueError, "teacher_outputs must have one tensor per layer"),
    (lambda s, t: ([], []), ValueError, "student_outputs must hold at least one"),
    (lambda s, t: (s[0], t[0]), TypeError, "student_outputs must be a list or tuple"),
    (lambda s, t: (s, [t[0], t[1].t()]), ValueError, r"teacher_outputs\[1\] must have the shape"),
    (lambda s, t: (s, [t[0], t[1].float()]), TypeError, r"teacher_outputs\[1\] must have the dtype"),
    (lambda s, t: ([s[0], s[1].long()], t), TypeError, r"student_outputs\[1\] must be float"),
    (lambda s, t: ([s[0], "x"], t), TypeError, r"student_outputs\[1\] must be a torch.Tensor"),
])
def test_bad_layers(make, exc, words):
    student, teacher = layers(shapes=[(4, 3), (2, 5)])
    s, t = make(student, teacher)
    with pytest.raises(exc, match=words):
        slf.layer_imitation_loss(s, t)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(weights=[1.0]), ValueError, "weights must have one entry per layer"),
    (dict(weights=[1.0, -1.0]), ValueError, r"weights\[1\] must be >= 0"),
    (dict(weights=torch.ones(2)), TypeError, "weights must be a list or tuple of Python numbers"),
    (dict(weights=[1.0, float("nan")]), ValueError, r"weights\[1\] must be finite"),
    (dict(reduction="none"), ValueError, "reduction must be one of"),
    (dict(reduction=["mean"]), ValueError, "reduction must be one string or one per layer"),
    (dict(per_layer=1), TypeError, "per_layer must be a bool"),
    (dict(backend="cuda"), slf.BackendUnavailable, "no cuda kernel for layer_imitation_loss"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_bad_options(kwargs, exc, words):
    student, teacher = layers(shapes=[(4, 3), (2, 5)])
    with pytest.raises(exc, match=words):
        slf.layer_imitation_loss(student, teacher, **kwargs)


# ---------------------------------------------------------------- WideThenNarrow


def mlp(width, depth=4, d_in=12, d_out=3):
    blocks = [nn.Sequential(nn.Linear(d_in, width), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth - 2)]
    return nn.Sequential(*blocks, nn.Linear(width, d_out))


def toy_task(n=256, d_in=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :3].argmax(1)).long()
    return x, y


def test_adapters_between_blocks_and_identity_start():
    torch.manual_seed(0)
    wtn = slf.WideThenNarrow(mlp(32), mlp(6), torch.randn(4, 12))
    assert [(m.in_features, m.out_features) for m in wtn.widen] == [(6, 32)] * 3
    assert [(m.in_features, m.out_features) for m in wtn.narrow] == [(32, 6)] * 3
    x = torch.randn(10, 12)
    # M_2 M_1 = I at the start: the adapted thin network computes the thin network
    torch.testing.assert_close(wtn(x), wtn.thin(x), rtol=1e-5, atol=1e-5)
    # equal widths need no adapters
    same = slf.WideThenNarrow(mlp(8), mlp(8), torch.randn(4, 12))
    assert all(isinstance(m, nn.Identity) for m in list(same.widen) + list(same.narrow))


def test_imitation_loss_is_the_prefix_composite():
    torch.manual_seed(1)
    wide, thin = mlp(16), mlp(5)
    wtn = slf.WideThenNarrow(wide, thin, torch.randn(4, 12), layer_weights=[1.0, 0.5, 0.25, 2.0],
                             reduction="batchmean")
    x = torch.randn(9, 12)
    h, expected, b = x, 0.0, x
    for i in range(4):
        a = thin[i](h)
        if i < 3:
            a = wtn.widen[i](a)
            h = wtn.narrow[i](a)
        b = wide[i](b)
        expected = expected + wtn.layer_weights[i] * ((a - b) ** 2).sum() / 9
    torch.testing.assert_close(wtn.imitation_loss(x), expected, rtol=1e-5, atol=1e-6)
    assert wtn.imitation_loss(x, per_layer=True).shape == (4,)
    assert len(wtn.student_outputs(x, upto=2)) == 2


def test_merge_is_exact_for_linear_and_conv_and_bridges_otherwise():
    torch.manual_seed(2)
    x = torch.randn(6, 12)
    wtn = slf.WideThenNarrow(mlp(16), mlp(5), x)
    with torch.no_grad():
        for m in list(wtn.widen) + list(wtn.narrow):
            m.weight.normal_()  # a product far from the identity
        before = wtn(x)
    thin = wtn.narrow_()
    torch.testing.assert_close(thin(x), before, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in thin.parameters()) == sum(p.numel() for p in mlp(5).parameters())

    def cnn(c):
        return nn.Sequential(nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU()),
                             nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()),
                             nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 4)))

    xi = torch.randn(3, 1, 4, 4)
    conv = slf.WideThenNarrow(cnn(8), cnn(3), xi)
    with torch.no_grad():
        for m in list(conv.widen) + list(conv.narrow):
            m.weight.normal_()
        before = conv(xi)
    with pytest.warns(UserWarning, match="block 2 of the thin network does not begin"):
        thin = conv.narrow_()  # block 2 begins with Flatten: its product stays as a bridge in front of it
    assert len(thin) == 3 and isinstance(thin[1][0], nn.Conv2d)  # block 1's product merged into its conv
    assert isinstance(thin[2][0], slf.FeatureLinear)
    torch.testing.assert_close(thin(xi), before, rtol=1e-4, atol=1e-4)

    odd = nn.Sequential(nn.Sequential(nn.Linear(12, 5), nn.Tanh()), nn.Sequential(nn.Tanh(), nn.Linear(5, 3)))
    wide = nn.Sequential(nn.Sequential(nn.Linear(12, 9), nn.Tanh()), nn.Sequential(nn.Tanh(), nn.Linear(9, 3)))
    w = slf.WideThenNarrow(wide, odd, x)
    with torch.no_grad():
        before = w(x)
    with pytest.warns(UserWarning, match="does not begin with a linear layer"):
        thin = w.narrow_()
    assert isinstance(thin[1][0], slf.FeatureLinear)
    torch.testing.assert_close(thin(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        w.imitate((x, torch.zeros(6, dtype=torch.long)), epochs=1)


def test_sequence_features_on_the_last_axis():
    torch.manual_seed(3)

    def seq(d):
        return nn.Sequential(nn.Sequential(nn.Linear(7, d), nn.GELU()), nn.Sequential(nn.Linear(d, d), nn.GELU()),
                             nn.Linear(d, 2))

    x = torch.randn(4, 5, 7)
    wtn = slf.WideThenNarrow(seq(12), seq(3), x, feature_dim=-1)
    assert wtn.imitation_loss(x).dim() == 0
    with torch.no_grad():
        for m in list(wtn.widen) + list(wtn.narrow):
            m.weight.normal_()
        before = wtn(x)
    torch.testing.assert_close(wtn.narrow_()(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["joint", "progressive"])
def test_three_stages_end_to_end(schedule):
    torch.manual_seed(4)
    x, y = toy_task()
    wtn = slf.WideThenNarrow(mlp(32), mlp(6), x[:4])
    g = torch.Generator().manual_seed(0)
    wide_hist = wtn.fit_wide((x, y), epochs=8, lr=3e-3, generator=g, progress=False)
    assert wide_hist[-1]["loss"] < wide_hist[0]["loss"]
    imit = wtn.imitate((x, y), epochs=8, schedule=schedule, lr=3e-3, generator=g, progress=False)
    if schedule == "joint":
        assert imit[-1]["loss"] < imit[0]["loss"] and all(r["layers"] == 4 for r in imit)
    else:
        assert [r["layers"] for r in imit] == [1, 1, 2, 2, 3, 3, 4, 4]
    tune = wtn.fine_tune((x, y), epochs=3, lr=3e-3, generator=g, progress=False)
    assert wtn.merged and len(tune) == 3
    assert set(wtn.history) == {"wide", "imitation", "fine_tune"}
    thin = wtn.thin
    assert thin(x).shape == (256, 3) and torch.isfinite(thin(x)).all()


def test_fit_runs_the_three_stages():
    torch.manual_seed(5)
    x, y = toy_task(n=64)
    thin = slf.WideThenNarrow(mlp(16), mlp(4), x[:2]).fit((x, y), wide_epochs=1, imitation_epochs=1,
                                                           fine_tune_epochs=1, batch_size=32, progress=False)
    assert isinstance(thin, nn.Sequential) and thin(x).shape == (64, 3)


def test_wide_then_narrow_bad_input():
    x = torch.randn(4, 12)
    with pytest.raises(TypeError, match="wide must be an nn.Sequential"):
        slf.WideThenNarrow(nn.Linear(12, 3), mlp(4), x)
    with pytest.raises(ValueError, match="same number of blocks"):
        slf.WideThenNarrow(mlp(8, depth=3), mlp(4), x)
    with pytest.raises(ValueError, match="last blocks must produce outputs of the same shape"):
        slf.WideThenNarrow(mlp(8, d_out=4), mlp(4), x)
    with pytest.raises(ValueError, match="layer_weights|weights must have one entry per layer"):
        slf.WideThenNarrow(mlp(8), mlp(4), x, layer_weights=[1.0])
    wtn = slf.WideThenNarrow(mlp(8), mlp(4), x)
    with pytest.raises(ValueError, match="schedule must be one of"):
        wtn.imitate((x, torch.zeros(4, dtype=torch.long)), epochs=1, schedule="random")
    with pytest.raises(ValueError, match="epochs must be a non-negative int"):
        wtn.fit_wide((x, torch.zeros(4, dtype=torch.long)), epochs=-1)
    with pytest.raises(TypeError, match="data must be a tuple"):
        wtn.fit_wide(x, epochs=1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        wtn.fit_wide((x, torch.zeros(4, dtype=torch.long)), epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="may differ only along feature_dim"):
        slf.WideThenNarrow(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()),
                           nn.Sequential(nn.Conv2d(1, 2, 5), nn.Flatten()), torch.randn(2, 1, 8, 8))

# ---------------------------------------------------------------- example and docs


def test_digits_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "imitation_digits.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for words in ("wide-then-narrow", "scratch", "accuracy", "+-"):
        assert words in proc.stdout, proc.stdout
    assert (tmp_path / "imitation_digits.png").stat().st_size > 1000

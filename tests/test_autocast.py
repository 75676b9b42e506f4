"""Mixed precision: every public loss under torch.autocast (bfloat16 and float16) returns what
F.cross_entropy returns there (float32) and computes it in float32 (the value of the float32
computation on the same 16-bit inputs), the custom ops' autocast rules, and the linear losses'
mixed-precision inputs (16-bit activations with float32 master weights, (..., H) hidden states)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast.softmax import _ops as softmax_ops
from tests.catalog import CASES
from tests.helpers import can_run, triton_device

DTYPES = [torch.bfloat16, torch.float16]
HEADS = {"normface_loss", "cosface_loss", "arcface_loss", "circle_class_loss", "normalized_softmax_loss",
         "proxy_nca_loss", "subcenter_arcface_loss", "soft_triple_loss"}
# Losses whose inputs go through a network (its layers are autocast, as they should be).
NETWORK = {"nce_ranking_loss", "regression_loss", "margin_loss", "seal_task_loss", "pgd_adversarial_loss",
           "trades_loss"}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_loss_under_autocast_returns_float32_computed_in_float32(case, dtype):
    inputs, const = case.build(6, dtype, torch.Generator().manual_seed(0))
    reduction = case.reductions[0]
    for backend, device in case.available():
        xs = [t.to(device).requires_grad_(True) for t in inputs]
        with torch.autocast(device.type, dtype=dtype):
            out = case.call(backend, reduction, *xs, **const)
        assert out.dtype == torch.float32, f"{case.name} {backend}: {out.dtype}"
        grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
        assert all(g is None or g.dtype == x.dtype for g, x in zip(grads, xs))
        expected = case.call(backend, reduction, *[x.detach().float() for x in xs],
                             **{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                for k, v in const.items()})
        # Products autocast takes in 16 bits (F.linear's and matmul's rule): the margin heads'
        # cosines of normalized (float32) vectors, at scale s the logits move by ~s * 2^-8; the
        # Triton pairwise kernel's similarity tiles.
        products = case.name.split("[")[0] in HEADS or (backend == "triton" and case.op == "pairwise_loss")
        tol = 5e-2 if case.name.split("[")[0] in NETWORK or products else 1e-4
        torch.testing.assert_close(out, expected.to(out.dtype), rtol=tol, atol=tol,
                                   msg=lambda m: f"{case.name} {backend} {dtype}: {m}")


def test_softmax_op_autocast_rule_is_float32():
    """The op itself: under autocast 16-bit logits are taken in float32 (F.cross_entropy's rule)."""
    x = torch.randn(5, 7).to(torch.bfloat16)
    t = torch.randint(0, 7, (5,))
    params = softmax_ops.make_params(0.75, 1.0, 0.0, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats, grad = torch.ops.structloss_fast.softmax_loss(x, t, None, -100, 0, params, True)
    exp_stats, exp_grad = torch.ops.structloss_fast.softmax_loss(x.float(), t, None, -100, 0, params, True)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(stats, exp_stats)
    torch.testing.assert_close(grad, exp_grad)


def test_linear_op_autocast_rule_products_in_autocast_dtype():
    """The fused linear op under autocast takes input, weight and bias in the autocast dtype (as
    F.linear would), so float32 master weights meet 16-bit activations; its internal products
    are not autocast again."""
    x, W, b = torch.randn(6, 8), torch.randn(9, 8), torch.randn(9)
    t = torch.randint(0, 9, (6,))
    params = softmax_ops.make_params(1.0, 0.0, 0.0, 1e-5)
    for dtype in DTYPES:
        with torch.autocast("cpu", dtype=dtype):
            stats = torch.ops.structloss_fast.linear_softmax_loss(x, W, b, t, None, -100, 0, params,
                                                                  [False, False, False], 0, 0)[0]
        exp = torch.ops.structloss_fast.linear_softmax_loss(x.to(dtype), W.to(dtype), b.to(dtype), t, None, -100, 0,
                                                            params, [False, False, False], 0, 0)[0]
        torch.testing.assert_close(stats, exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_linear_encouraging_loss_in_a_mixed_precision_model(dtype):
    """The standard set-up: an autocast model's 16-bit hidden states, an fp32 lm_head; (B, T, H)
    with (B, T) targets; the loss as F.cross_entropy(F.linear(h, W), t) gives it under autocast."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 11)
    h = torch.randn(2, 3, 16, generator=gen).to(dtype).requires_grad_(True)
    t = torch.randint(0, 11, (2, 3), generator=gen)
    t[0, 1] = -100
    with torch.autocast("cpu", dtype=dtype):
        ours = slf.linear_encouraging_loss(h, head.weight, t, head.bias, bonus_weight=0.0)
        theirs = F.cross_entropy(F.linear(h, head.weight, head.bias).flatten(0, 1), t.flatten())
        none = slf.linear_encouraging_loss(h, head.weight, t, head.bias, bonus_weight=0.0, reduction="none")
    assert ours.dtype == theirs.dtype == torch.float32
    assert none.shape == (2, 3) and none[0, 1] == 0
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    gh, gw = torch.autograd.grad(ours, (h, head.weight))
    assert gh.dtype == dtype and gw.dtype == torch.float32
    th, tw = torch.autograd.grad(theirs, (h, head.weight))
    torch.testing.assert_close(gh.float(), th.float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(gw, tw, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_linear_mixed_dtypes_without_autocast(backend):
    """bf16 activations with fp32 weights outside autocast: computed in the promoted dtype (float32)."""
    if backend != "reference" and not can_run(backend, "linear_softmax_loss"):
        pytest.skip(f"{backend} is not available here")
    device = triton_device() if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(4, 5, 8, generator=gen).to(torch.bfloat16).to(device).requires_grad_(True)
    W = torch.randn(9, 8, generator=gen).to(device).requires_grad_(True)
    t = torch.randint(0, 9, (4, 5), generator=gen).to(device)
    out = slf.linear_encouraging_loss(h, W, t, backend=backend, reduction="none")
    assert out.dtype == torch.float32 and out.shape == (4, 5)
    exp = slf.encouraging_loss(h.detach().float().reshape(20, 8) @ W.detach().T, t.reshape(20), reduction="none",
                               backend="reference").reshape(4, 5)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(out.sum(), (h, W))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    xs = h.detach().float().requires_grad_(True)
    W2 = W.detach().requires_grad_(True)
    eh, ew = torch.autograd.grad(slf.encouraging_loss(xs.reshape(20, 8) @ W2.T, t.reshape(20), reduction="sum",
                                                      backend="reference"), (xs, W2))
    torch.testing.assert_close(gh.float(), eh.to(torch.bfloat16).float())
    torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-5)


def test_margin_heads_mixed_dtypes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    P = torch.randn(7, 5, generator=gen)
    y = torch.randint(0, 7, (6,), generator=gen)
    for fused in (True, False):
        out = slf.arcface_loss(x, P, y, fused=fused)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, slf.arcface_loss(x.float(), P, y, fused=fused))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_cuda_autocast(dtype):
    dev = torch.device("cuda")
    head = torch.nn.Linear(16, 11).to(dev)
    h = torch.randn(2, 3, 16, device=dev).to(dtype)
    t = torch.randint(0, 11, (2, 3), device=dev)
    e = torch.randn(8, 16, device=dev)
    y = torch.randint(0, 3, (8,), device=dev)
    with torch.autocast("cuda", dtype=dtype):
        lin = slf.linear_encouraging_loss(h, head.weight, t, head.bias, bonus_weight=0.0)
        ref = F.cross_entropy(F.linear(h, head.weight, head.bias).flatten(0, 1), t.flatten())
        logits = head(e)
        el = slf.encouraging_loss(logits, y, bonus_weight=0.0)
        ce = F.cross_entropy(logits, y)
        pw = slf.circle_loss(head(e), y)
    assert lin.dtype == el.dtype == pw.dtype == ce.dtype == torch.float32
    torch.testing.assert_close(lin, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(el, ce, rtol=1e-4, atol=1e-4)

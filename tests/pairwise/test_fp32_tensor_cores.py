"""fp32 embeddings go to the tensor cores as 3xTF32 (Triton's input_precision="tf32x3": each
operand split into a TF32 high part and a TF32 low part, three TF32 products accumulated in
fp32). The interpreter ignores input_precision, so the mode's accuracy is checked here by
emulating its arithmetic on the CPU: the losses computed from 3xTF32 similarities (and
3xTF32 gradient products) meet the low-precision criterion, at most 2x PyTorch's own fp32
error against a float64 truth; one TF32 product (plain "tf32") does not, which shows that the
check can fail. On a GPU, tests/test_gpu.py checks the kernels themselves."""
from __future__ import annotations

import pytest
import torch

from structloss_fast.pairwise import _triton as tk
from structloss_fast.pairwise import reference as ref
from tests.helpers import max_abs

LOW_MASK = ~0x1FFF  # the 13 mantissa bits TF32 drops


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: to 10 mantissa bits, ties away from zero (on the magnitude bits)."""
    return ((x.view(torch.int32) + 0x1000) & LOW_MASK).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """What a TF32 MMA reads of an fp32 register: the top 10 mantissa bits."""
    return (x.view(torch.int32) & LOW_MASK).view(torch.float32)


def mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_big, b_big = tf32_round(a), tf32_round(b)
    a_small, b_small = tf32_truncate(a - a_big), tf32_truncate(b - b_big)
    return (a_small @ b_big + a_big @ b_small) + a_big @ b_big


def mm_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return tf32_round(a) @ tf32_round(b)


def _similarity_with(mm):
    class Similarity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, r):
            ctx.save_for_backward(x, r)
            return mm(x, r.t().contiguous())

        @staticmethod
        def backward(ctx, g):
            x, r = ctx.saved_tensors
            return mm(g.contiguous(), r), mm(g.t().contiguous(), x)

    def unit_similarity(x_hat, r_hat):
        return Similarity.apply(x_hat, r_hat) if x_hat.dtype == torch.float32 else x_hat @ r_hat.T

    return unit_similarity


def _loss_and_grad(fn, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, y, **kw)
    g, = torch.autograd.grad(out, x)
    return out.detach(), g


CASES = [("circle_loss", dict(m=0.25, gamma=256.0)), ("supcon_loss", dict(temperature=0.05)),
         ("multi_similarity_loss", {})]


def test_triton_uses_3xtf32_for_fp32():
    assert tk.precision(torch.float32) == "tf32x3"
    assert tk.precision(torch.float64) == "ieee"


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_3xtf32_meets_the_fp32_criterion_and_tf32_does_not(monkeypatch, name, kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 256, dtype=torch.float64, generator=g)
    y = torch.randint(0, 24, (96,), generator=g)
    fn = getattr(ref, name)
    truth, g_truth = _loss_and_grad(fn, x, y, **kw)
    torch_fp32, g_fp32 = _loss_and_grad(fn, x.float(), y, **kw)
    errors = {}
    for mode, mm in (("tf32x3", mm_tf32x3), ("tf32", mm_tf32)):
        monkeypatch.setattr(ref, "unit_similarity", _similarity_with(mm))
        out, gr = _loss_and_grad(fn, x.float(), y, **kw)
        errors[mode] = (max_abs(out, truth), max_abs(gr, g_truth))
    own = (max_abs(torch_fp32, truth), max_abs(g_fp32, g_truth))
    assert errors["tf32x3"][0] <= 2 * own[0] + 1e-7, (errors, own)
    assert errors["tf32x3"][1] <= 2 * own[1] + 1e-9, (errors, own)
    assert errors["tf32"][0] > 2 * own[0] + 1e-7 or errors["tf32"][1] > 2 * own[1] + 1e-9, (errors, own)

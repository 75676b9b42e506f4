"""Every family, every backend: transposed, sliced (strided) and expanded inputs give the result
of the same values laid out contiguously, forward and gradient.

The layouts are built as views of a leaf tensor, so the gradient reaches the leaf through the
view (an expanded input sums its rows' gradients into the one stored row): each layout's
gradient is compared with the contiguous run's gradient brought to the leaf the same way.
Kernels that assumed a unit inner stride, or the layout of the first argument, fail here.
"""
from __future__ import annotations

import pytest
import torch

import structloss_fast as slf
from tests.helpers import assert_tight, fast_backends


def transposed(t: torch.Tensor):
    """(leaf, view of a leaf): the values of t stored column-major (a 2-D t)."""
    return t.detach().t().contiguous(), lambda leaf: leaf.t()


def sliced(t: torch.Tensor):
    """The values of t at every other row and column of a larger tensor (NaN elsewhere: a
    kernel that reads past the view's elements gives NaN)."""
    index = tuple(slice(1, None, 2) for _ in t.shape)
    big = torch.full([2 * s + 1 for s in t.shape], float("nan"), dtype=t.dtype)
    big[index] = t.detach()
    return big, lambda leaf: leaf[index]


def row_sliced(t: torch.Tensor):
    """t as the leading columns of a wider tensor (unit inner stride, a longer row stride)."""
    big = torch.full((t.shape[0], t.shape[1] + 5), float("nan"), dtype=t.dtype)
    big[:, :t.shape[1]] = t.detach()
    return big, lambda leaf: leaf[:, :t.shape[1]]


def expanded(t: torch.Tensor):
    """t's first row repeated over its first dimension with stride 0 (t's values change: the
    contiguous run gets the same repeated values)."""
    return t.detach()[:1].clone(), lambda leaf: leaf.expand(t.shape)


LAYOUTS = {"transposed": transposed, "sliced": sliced, "row_sliced": row_sliced, "expanded": expanded}


def on(device, inputs: dict) -> dict:
    """The inputs moved to `device` (leaves again, with their requires_grad)."""
    return {k: v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def check_layouts(fn, inputs: dict, vary: str, layouts=tuple(LAYOUTS), rtol=1e-11):
    """fn(**inputs) with inputs[vary] in each layout against the same values contiguous, and
    the gradient of the sum of its outputs at the layout's leaf against the contiguous run's
    gradient routed to that leaf through the same view (all on inputs[vary]'s device)."""
    wants_grad = inputs[vary].requires_grad
    for name in layouts:
        leaf, make_view = LAYOUTS[name](inputs[vary].cpu())
        leaf = leaf.to(inputs[vary].device).requires_grad_(wants_grad)
        view = make_view(leaf)
        assert not view.is_contiguous() or name == "expanded" and view.shape[0] == 1
        out = fn(**{**inputs, vary: view})
        c = view.detach().contiguous().requires_grad_(wants_grad)
        expected = fn(**{**inputs, vary: c})
        assert_tight(out, expected, rtol=rtol, atol=1e-12, what=f"{vary} {name}: value")
        if wants_grad:
            g, = torch.autograd.grad(out.sum(), leaf)
            gc, = torch.autograd.grad(expected.sum(), c)
            probe = leaf.detach().clone().requires_grad_(True)
            routed, = torch.autograd.grad((make_view(probe) * gc).sum(), probe)
            keep = ~torch.isnan(leaf.detach())
            assert_tight(g[keep], routed[keep], rtol=rtol, atol=1e-12, what=f"{vary} {name}: gradient")


def _backends(op, extra=("reference",)):
    return [pytest.param(b, d, id=f"{b}-{d.type}") for b, d in fast_backends(op)] + \
        [pytest.param(b, torch.device("cpu"), id=b) for b in extra]


# ---------------------------------------------------------------- pairwise


@pytest.mark.parametrize("backend,device", _backends("pairwise_loss"))
@pytest.mark.parametrize("loss", ["circle_loss", "contrastive_loss"])
def test_pairwise_layouts(backend, device, loss):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 20, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3])

    def fn(x, y):
        return getattr(slf, loss)(x, y, backend=backend, reduction="none")

    check_layouts(fn, on(device, {"x": x, "y": y}), "x")


@pytest.mark.parametrize("backend,device", _backends("pairwise_loss"))
def test_pairwise_reference_layouts(backend, device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 18, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.randn(9, 18, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ry = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0])

    def fn(x, r, y, ry):
        return slf.supcon_loss(x, y, ref_embeddings=r, ref_labels=ry, backend=backend, reduction="none")

    check_layouts(fn, on(device, {"x": x, "r": r, "y": y, "ry": ry}), "r", layouts=("transposed", "sliced", "expanded"))


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("backend,device", _backends("softmax_loss"))
def test_encouraging_layouts(backend, device):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 45, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.tensor([0, 3, 44, 7, -100, 3, 12])
    w = torch.rand(45, dtype=torch.float64, generator=g) + 0.5

    def fn(logits, target, w):
        return slf.encouraging_loss(logits, target, weight=w, label_smoothing=0.1, reduction="none",
                                    backend=backend)

    inputs = on(device, {"logits": logits, "target": target, "w": w})
    check_layouts(fn, inputs, "logits")
    check_layouts(fn, inputs, "w", layouts=("sliced", "expanded"))


@pytest.mark.parametrize("backend,device", _backends("linear_softmax_loss"))
@pytest.mark.parametrize("vary", ["x", "weight"])
def test_linear_encouraging_layouts(backend, device, vary):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 12, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(37, 12, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(37, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.tensor([0, 3, 36, 7, 1, 3, 12, 5, 5])

    def fn(x, weight, bias, target):
        return slf.linear_encouraging_loss(x, weight, target, bias, reduction="sum", backend=backend,
                                           chunk_rows=4).reshape(1)

    check_layouts(fn, on(device, {"x": x, "weight": weight, "bias": bias, "target": target}), vary,
                  layouts=("transposed", "sliced", "row_sliced"))


@pytest.mark.parametrize("backend,device", _backends("softmax_loss"))
def test_margin_head_layouts(backend, device):
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(8, 10, dtype=torch.float64, generator=g).requires_grad_()
    proxies = torch.randn(21, 10, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 20, 5, 6, 7])

    def fn(emb, proxies, labels):
        return slf.arcface_loss(emb, proxies, labels, reduction="none", backend=backend)

    inputs = on(device, {"emb": emb, "proxies": proxies, "labels": labels})
    check_layouts(fn, inputs, "emb")
    check_layouts(fn, inputs, "proxies", layouts=("transposed", "sliced"))


# ---------------------------------------------------------------- seal


@pytest.mark.parametrize("backend,device", _backends("seal_nce_loss"))
@pytest.mark.parametrize("vary", ["unary", "probs", "weight"])
def test_seal_layouts(backend, device, vary):
    g = torch.Generator().manual_seed(8)
    B, L, H = 5, 19, 6
    inputs = on(device, dict(
        unary=torch.randn(B, L, dtype=torch.float64, generator=g).requires_grad_(),
        probs=torch.rand(B, L, dtype=torch.float64, generator=g),
        labels=(torch.rand(B, L, generator=g) < 0.3).double(),
        weight=(0.3 * torch.randn(H, L, dtype=torch.float64, generator=g)).requires_grad_(),
        bias=torch.randn(H, dtype=torch.float64, generator=g),
        out=torch.randn(H, dtype=torch.float64, generator=g),
    ))

    def fn(unary, probs, labels, weight, bias, out):
        gen = torch.Generator(device=unary.device).manual_seed(11)  # the same samples every call
        return slf.sampled_nce_loss(unary, probs, labels, weight, bias, out, num_samples=6, reduction="none",
                                    generator=gen, backend=backend)

    check_layouts(fn, inputs, vary, layouts=("transposed", "sliced", "expanded"))


# ---------------------------------------------------------------- jem, taskmet, imitation


@pytest.mark.parametrize("backend,device", _backends("sgld_step_", extra=()))
def test_sgld_step_layouts(backend, device):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 11, dtype=torch.float64, generator=g).to(device)
    grad = torch.randn(6, 11, dtype=torch.float64, generator=g).to(device)
    noise = torch.randn(6, 11, dtype=torch.float64, generator=g).to(device)
    expected = x.clone()
    slf.sgld_step_(expected, grad, step_size=0.1, noise_std=0.01, noise=noise, backend=backend)
    for name in ("transposed", "sliced", "row_sliced"):
        for which in ("x", "grad", "noise"):
            leaf, make_view = LAYOUTS[name](dict(x=x, grad=grad, noise=noise)[which].cpu())
            view = make_view(leaf.to(device))
            args = dict(x=x.clone(), grad=grad, noise=noise)
            args[which] = view
            slf.sgld_step_(args["x"], args["grad"], step_size=0.1, noise_std=0.01, noise=args["noise"],
                           backend=backend)
            assert_tight(args["x"], expected, rtol=1e-14, what=f"{which} {name}")


@pytest.mark.parametrize("backend,device", _backends("cg_dense"))
def test_cg_layouts(backend, device):
    g = torch.Generator().manual_seed(10)
    n = 9
    m = torch.randn(n, n, dtype=torch.float64, generator=g)
    A = (m @ m.T + n * torch.eye(n, dtype=torch.float64)).requires_grad_()
    b = torch.randn(n, 3, dtype=torch.float64, generator=g).requires_grad_()

    def fn(A, b):
        return slf.cg(A, b, rtol=1e-13, atol=0.0, backend=backend).x

    inputs = on(device, {"A": A, "b": b})
    check_layouts(fn, inputs, "b", layouts=("transposed", "sliced", "row_sliced"), rtol=1e-9)
    check_layouts(fn, inputs, "A", layouts=("transposed", "sliced"), rtol=1e-9)


@pytest.mark.parametrize("backend,device", _backends("layer_imitation_loss"))
def test_imitation_layouts(backend, device):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(5, 14, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(5, 14, dtype=torch.float64, generator=g)

    def fn(s, t):
        return slf.layer_imitation_loss([s], [t], backend=backend).reshape(1)

    inputs = on(device, {"s": s, "t": t})
    check_layouts(fn, inputs, "s")
    check_layouts(fn, inputs, "t")

"""Higher-order gradients of every public loss, every reduction and every backend: with
create_graph=True the second derivative is either exact (the reference's, and float64
gradgradcheck where the loss is smooth) or an error that names the loss, never a silently
wrong or dropped gradient. Also the solves of taskmet (cg, implicit_argmin)."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import structloss_fast as slf
from tests.catalog import CASE_IDS, CASES


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    return obj


def second_order(case, backend, device, reduction, inputs, const, seed=0):
    """d/d inputs of <d loss/d inputs, v> for fixed random output weights and directions v (the
    Hessian-vector products a gradient penalty needs)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [t.detach().to(device).requires_grad_(True) for t in inputs]
    out = case.call(backend, reduction, *xs, **_to(const, device))
    w = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(device, out.dtype) + 0.5
    gs = torch.autograd.grad(out, xs, w, create_graph=True, allow_unused=True)
    s = sum((g * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(device)).sum()
            for g in gs if g is not None and g.requires_grad)
    if not torch.is_tensor(s):  # no gradient depends on the inputs: the second derivative is 0
        return [torch.zeros_like(x) for x in xs]
    hs = torch.autograd.grad(s, xs, allow_unused=True)
    return [torch.zeros_like(x) if h is None else h for h, x in zip(hs, xs)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_second_derivative_is_exact_or_a_named_error(case):
    inputs, const = case.build(6, torch.float64, torch.Generator().manual_seed(1))
    public = case.name.split("[")[0]
    for reduction in case.reductions:
        expected = second_order(case, "reference", torch.device("cpu"), reduction, inputs, const)
        for backend, device in case.available()[1:]:
            if case.second_order == "raises":
                with pytest.raises(RuntimeError, match=f"{public}.*no second derivative"):
                    second_order(case, backend, device, reduction, inputs, const)
                continue
            got = second_order(case, backend, device, reduction, inputs, const)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g.cpu(), e, rtol=1e-7, atol=1e-9,
                                           msg=lambda m: f"{case.name} {backend} {reduction}: {m}")


SMOOTH_EXACT = [c for c in CASES if c.second_order == "exact" and c.smooth]


@pytest.mark.parametrize("case", SMOOTH_EXACT, ids=[c.name for c in SMOOTH_EXACT])
def test_gradgradcheck_float64(case):
    """The reference and the compiled backend against finite differences of their own gradient
    (the Triton backend's second derivative is the reference's, checked above)."""
    inputs, const = case.build(4, torch.float64, torch.Generator().manual_seed(2))
    reduction = "none" if "none" in case.reductions else case.reductions[0]
    for backend, device in case.available():
        if backend == "triton":
            continue
        xs = [t.to(device).requires_grad_(True) for t in inputs]
        c = _to(const, device)
        assert gradgradcheck(lambda *a: case.call(backend, reduction, *a, **c), xs, atol=1e-6, rtol=1e-4,
                             fast_mode=True), f"{case.name} {backend}"


def test_the_sweep_covers_every_public_loss():
    from tests.catalog import public_losses

    assert public_losses() <= {c.name.split("[")[0] for c in CASES}


def test_pairwise_reference_double_backward_is_autograd_of_the_definition():
    """The issue's case: float64, B=16, D=8; the fast backends raise, the reference is exact."""
    x0 = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))
    x = x0.clone().requires_grad_(True)
    g, = torch.autograd.grad(slf.unified_loss(x, t, backend="reference"), x, create_graph=True)
    g.pow(2).sum().backward()
    assert gradgradcheck(lambda a: slf.unified_loss(a, t[:6], gamma=4.0, backend="reference"),
                         (x0[:6].clone().requires_grad_(),), fast_mode=True)
    x2 = x0.clone().requires_grad_(True)
    g2, = torch.autograd.grad(slf.circle_loss(x2, t, backend="cpu"), x2, create_graph=True)
    with pytest.raises(RuntimeError, match="circle_loss has no second derivative"):
        g2.pow(2).sum().backward()


@pytest.mark.parametrize("kind", ["pgd", "trades"])
def test_adversarial_losses_second_derivative_in_the_parameters(kind):
    """With a zero-step attack from x (the attack's result is a constant of the loss), the loss
    is an ordinary function of the model's parameters: its second derivative there is exact."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    fn = slf.pgd_adversarial_loss if kind == "pgd" else slf.trades_loss

    def loss(weight, bias):
        functional = lambda inp: torch.func.functional_call(model, {"weight": weight, "bias": bias}, (inp,))  # noqa: E731
        wrapped = _Call(functional)
        return fn(wrapped, x, y, eps=0.1, n_iter=0, random_start=False, clamp=None)

    assert gradgradcheck(loss, (params["weight"], params["bias"]))


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ---------------------------------------------------------------- taskmet's solves


def _spd(n, batch, gen):
    M = torch.randn(batch, n, n, dtype=torch.float64, generator=gen)
    return M @ M.mT + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cg_dense_solve_second_derivative(backend):
    gen = torch.Generator().manual_seed(4)
    P = _spd(4, 2, gen).requires_grad_(True)
    b = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(P, b):
        return slf.cg(0.5 * (P + P.mT), b, rtol=1e-14, maxiter=200, backend=backend).x

    assert gradgradcheck(f, (P, b), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_cg_matrix_free_solve_second_derivative():
    gen = torch.Generator().manual_seed(5)
    A = _spd(4, 2, gen)
    b = torch.randn(2, 4, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(b):
        return slf.cg(lambda p: (A @ p.unsqueeze(-1)).squeeze(-1), b, rtol=1e-14, maxiter=200).x

    assert gradgradcheck(f, (b,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_implicit_argmin_second_derivative_is_a_named_error():
    A = _spd(3, 1, torch.Generator().manual_seed(6))[0]
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def inner(theta, p):
        return 0.5 * theta @ A @ theta - p @ theta

    theta = slf.implicit_argmin(inner, torch.linalg.solve(A, p.detach()), p, solver="exact")
    g, = torch.autograd.grad(theta.square().sum(), p, create_graph=True)
    torch.testing.assert_close(g, 2 * torch.linalg.solve(A, torch.linalg.solve(A, p.detach())))
    with pytest.raises(RuntimeError, match="implicit_argmin .*has no second derivative"):
        g.sum().backward()

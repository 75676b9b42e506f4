"""TaskMet: the Mahalanobis loss against the explicit-Lambda definition, the metric networks,
implicit differentiation against closed-form argmin gradients, the exact Hessian and unrolled
differentiation, the top-k and QP layers, the tasks, and short runs of the examples."""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

from structloss_fast import taskmet as tm
from structloss_fast.taskmet import tasks as tt
from structloss_fast.taskmet.implicit import IMPLICIT_SOLVERS
from structloss_fast.taskmet import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, max_abs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- Mahalanobis loss


FACTORS = {
    "per_sample": lambda B, n: (randn(B, n, 3, seed=2), False),
    "per_sample_square": lambda B, n: (randn(B, n, n, seed=2), False),
    "shared": lambda B, n: (randn(n, 2, seed=3), False),
    "diagonal": lambda B, n: (randn(B, n, seed=4), True),
    "diagonal_shared": lambda B, n: (randn(n, seed=5), True),
}


@pytest.mark.parametrize("kind", list(FACTORS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.3, "tensor"])
def test_mahalanobis_matches_explicit_lambda(kind, reduction, eps):
    B, n = 7, 5
    pred, target = randn(B, n, seed=0), randn(B, n, seed=1)
    L, diag = FACTORS[kind](B, n)
    e = torch.tensor(0.7, dtype=torch.float64) if eps == "tensor" else eps
    out = tm.mahalanobis_loss(pred, target, L, eps=e, diagonal=diag, reduction=reduction)
    exp = ref.mahalanobis_loss(pred, target, L, eps=e, diagonal=diag, reduction=reduction)
    assert out.shape == exp.shape
    assert_tight(out, exp, rtol=1e-13)


@pytest.mark.parametrize("kind", list(FACTORS))
def test_mahalanobis_gradcheck(kind):
    B, n = 4, 3
    pred = randn(B, n, seed=0).requires_grad_(True)
    target = randn(B, n, seed=1).requires_grad_(True)
    L, diag = FACTORS[kind](B, n)
    L = L.clone().requires_grad_(True)
    eps = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    f = lambda p, t, L_, e: tm.mahalanobis_loss(p, t, L_, eps=e, diagonal=diag, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, (pred, target, L, eps))
    # and the gradients agree with the explicit form
    g1 = torch.autograd.grad(f(pred, target, L, eps).sum(), (pred, L, eps))
    g2 = torch.autograd.grad(ref.mahalanobis_loss(pred, target, L, eps=eps, diagonal=diag, reduction="sum"),
                             (pred, L, eps))
    for a, b in zip(g1, g2):
        assert_tight(a, b, rtol=1e-12)


def test_mahalanobis_float32_within_torch_error():
    B, n = 64, 50
    pred, target, L = randn(B, n, seed=0), randn(B, n, seed=1), randn(B, n, n, seed=2)
    truth = ref.mahalanobis_loss(pred, target, L, reduction="none")
    out = tm.mahalanobis_loss(pred.float(), target.float(), L.float(), reduction="none")
    torch32 = ref.mahalanobis_loss(pred.float(), target.float(), L.float(), reduction="none")
    assert_close_to_truth(out, truth, torch32, factor=2.0, floor=1e-5, what="mahalanobis fp32")


def test_mahalanobis_never_forms_lambda():
    """Per-sample factors (B, n, r) with r << n: no (B, n, n) tensor is ever allocated."""
    B, n, r = 256, 400, 2
    pred, target, L = randn(B, n, dtype=torch.float32), randn(B, n, dtype=torch.float32, seed=1), \
        randn(B, n, r, dtype=torch.float32, seed=2).requires_grad_(True)
    sizes = []

    def hook(t):
        sizes.append(t.numel())
        return t

    from torch.utils._python_dispatch import TorchDispatchMode

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    sizes.append(o.numel())
            return out

    with Track():
        loss = tm.mahalanobis_loss(pred, target, L)
        loss.backward()
    assert max(sizes) <= B * n * r  # the factor's size, never B * n * n
    assert max(sizes) < B * n * n // 10


def test_mahalanobis_non_finite_and_empty():
    pred, target, L = randn(3, 4), randn(3, 4, seed=1), randn(3, 4, 2, seed=2)
    pred[1, 2] = float("nan")
    out = tm.mahalanobis_loss(pred, target, L, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    empty = tm.mahalanobis_loss(randn(0, 4), randn(0, 4), randn(0, 4, 2), reduction="sum")
    assert empty.item() == 0.0


def test_mahalanobis_bad_input():
    p, t = randn(3, 4), randn(3, 4)
    with pytest.raises(ValueError, match="target must have pred's shape"):
        tm.mahalanobis_loss(p, randn(3, 5), randn(3, 4, 2))
    with pytest.raises(ValueError, match="pred must be 2-D"):
        tm.mahalanobis_loss(randn(4), randn(4), randn(4, 2))
    with pytest.raises(ValueError, match=r"per-sample metric_factor must be \(B, n, r\)"):
        tm.mahalanobis_loss(p, t, randn(2, 4, 2))
    with pytest.raises(ValueError, match=r"shared metric_factor must be \(n, r\)"):
        tm.mahalanobis_loss(p, t, randn(5, 2))
    with pytest.raises(ValueError, match="with diagonal=True"):
        tm.mahalanobis_loss(p, t, randn(3, 4, 2), diagonal=True)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        tm.mahalanobis_loss(p, t, randn(3, 4, 2), eps=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        tm.mahalanobis_loss(p, t, randn(3, 4, 2), reduction="avg")
    with pytest.raises(TypeError, match="metric_factor must be"):
        tm.mahalanobis_loss(p, t, [[1.0]])


def test_metric_nets():
    x = randn(6, 3, dtype=torch.float32)
    net = tm.MetricNet(3, 4, hidden=16)
    L = net(x)
    assert L.shape == (6, 4, 4)
    Lam = net.metric(x)
    assert (torch.linalg.eigvalsh(Lam) > 0).all()  # PSD + identity weight 1: positive definite
    pred, target = randn(6, 4, dtype=torch.float32, seed=1), randn(6, 4, dtype=torch.float32, seed=2)
    d = (pred - target).unsqueeze(-1)
    explicit = (d.mT @ Lam @ d).flatten().mean()
    assert abs(net.loss(x, pred, target).item() - explicit.item()) <= 1e-5 * explicit.item()
    init = tm.MetricNet(3, 4, hidden=16, identity_init=True, identity_init_scale=1e6)
    assert max_abs(init(x), torch.eye(4).expand(6, 4, 4)) < 1e-3
    diag = tm.DiagonalMetricNet(3, 4, hidden=16, eps=0.1)
    lam = diag.metric(x)
    assert torch.equal(lam, torch.diag_embed(torch.diagonal(lam, dim1=-2, dim2=-1)))
    assert (torch.diagonal(lam, dim1=-2, dim2=-1) >= 0.1).all()
    explicit = (d.mT @ lam @ d).flatten().mean()
    assert abs(diag.loss(x, pred, target).item() - explicit.item()) <= 1e-5 * explicit.item()


# ---------------------------------------------------------------- implicit differentiation


def ridge_problem(seed=0, N=40, D=6):
    X, y = randn(N, D, seed=seed), randn(N, seed=seed + 1)

    def inner(theta, lam, yy):
        return 0.5 * (X @ theta - yy).square().sum() + 0.5 * lam * theta.square().sum()

    def solution(lam, yy):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(D, dtype=X.dtype), X.T @ yy)

    return X, y, inner, solution


@pytest.mark.parametrize("solver", IMPLICIT_SOLVERS)
def test_implicit_matches_closed_form_ridge(solver):
    X, y, inner, solution = ridge_problem()
    w = randn(X.shape[1], seed=7)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    yy = y.clone().requires_grad_(True)
    theta_star = solution(lam.detach(), y)
    info = {}
    theta = tm.implicit_argmin(inner, theta_star, lam, yy, solver=solver, rtol=1e-13, info=info)
    (theta * w).sum().backward()
    lam2 = lam.detach().clone().requires_grad_(True)
    yy2 = y.clone().requires_grad_(True)
    (solution(lam2, yy2) * w).sum().backward()
    assert_tight(lam.grad, lam2.grad, rtol=1e-9, what="d/dlambda")
    assert_tight(yy.grad, yy2.grad, rtol=1e-9, what="d/dy")
    if solver != "exact":
        res = info["cg"]
        assert res.converged.all()
        assert int(res.iterations) <= (6 if solver == "cg" else 20)


def test_implicit_matches_dense_hessian_reference_nonquadratic():
    """A non-quadratic inner problem (logistic regression with per-sample weights as params)."""
    N, D = 60, 4
    X = randn(N, D, seed=1)
    t = (randn(N, seed=2) > 0).double()

    def inner(theta, logw):
        z = X @ theta
        return (logw.exp() * torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none")).mean() \
            + 0.05 * theta.square().sum()

    logw = (0.3 * randn(N, seed=3)).requires_grad_(True)
    theta = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = inner(theta, logw.detach())
        loss.backward()
        return loss

    opt.step(closure)
    v = randn(D, seed=5)
    g_expected = ref.implicit_gradient(inner, theta.detach(), [logw.detach()], v)[0]
    for solver in IMPLICIT_SOLVERS:
        lw = logw.detach().clone().requires_grad_(True)
        th = tm.implicit_argmin(inner, theta.detach(), lw, solver=solver, rtol=1e-12)
        (th * v).sum().backward()
        assert_tight(lw.grad, g_expected, rtol=1e-7, atol=1e-12, what=solver)


def test_implicit_matches_unrolled_differentiation():
    X, y, inner, solution = ridge_problem(N=30, D=3)
    lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    w = randn(3, seed=4)
    th_star = solution(lam.detach(), y)
    implicit = torch.autograd.grad((tm.implicit_argmin(inner, th_star, lam, y, rtol=1e-13) * w).sum(), lam)[0]
    L = torch.linalg.eigvalsh(X.T @ X).max().item() + 2.0
    unrolled_th = tm.unrolled_argmin(inner, torch.zeros(3, dtype=torch.float64), lam, y, steps=400, lr=1.0 / L)
    unrolled = torch.autograd.grad((unrolled_th * w).sum(), lam)[0]
    assert max_abs(unrolled_th, th_star) < 1e-8
    assert abs(implicit.item() - unrolled.item()) <= 1e-6 * abs(implicit.item())
    short = tm.unrolled_argmin(inner, torch.zeros(3, dtype=torch.float64), lam, y, steps=5, lr=1.0 / L)
    assert abs(torch.autograd.grad((short * w).sum(), lam)[0].item() - implicit.item()) > 1e-3 * abs(implicit.item())


def test_implicit_weighted_least_squares_like_cubic():
    """The cubic task's inner problem: weighted least squares for a line, weights = the metric."""
    x = 2 * torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 1
    y = 10 * (x.pow(3) - 0.65 * x)
    feats = torch.stack([x, torch.ones_like(x)], dim=-1)

    def inner(theta, w):
        a, b = theta
        return (w * (a * x + b - y).square()).mean()

    def closed(w):
        WX = feats * w[:, None]
        return torch.linalg.solve(feats.T @ WX, WX.T @ y)

    w = (torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5).requires_grad_(True)
    sol = closed(w.detach())
    theta = tm.implicit_argmin(inner, (sol[0:1].squeeze(0), sol[1:2].squeeze(0)), w, rtol=1e-14)
    (3 * theta[0] - theta[1]).backward()
    w2 = w.detach().clone().requires_grad_(True)
    s2 = closed(w2)
    (3 * s2[0] - s2[1]).backward()
    assert_tight(w.grad, w2.grad, rtol=1e-9)


def test_implicit_structure_unused_params_and_no_grad():
    X, y, inner0, solution = ridge_problem(D=4)

    def inner(theta, lam, unused):
        a, b = theta
        return inner0(torch.cat([a, b]), lam, y)

    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    fixed = torch.tensor(5.0, dtype=torch.float64)  # needs no gradient
    sol = solution(lam.detach(), y)
    out = tm.implicit_argmin(lambda th, l, u, f: inner(th, l, u), (sol[:2], sol[2:]), lam, unused, fixed)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].requires_grad
    (out[0].sum() + out[1].sum()).backward()
    assert torch.equal(unused.grad, torch.zeros(3, dtype=torch.float64))
    assert lam.grad is not None and lam.grad.abs() > 0
    with torch.no_grad():
        plain = tm.implicit_argmin(inner, (sol[:2], sol[2:]), lam, unused)
    assert not plain[0].requires_grad


def test_implicit_negative_curvature_is_reported():
    """At a saddle point of the inner loss, CG meets p^T H p <= 0 and says so."""

    def inner(theta, c):
        return c * (theta[0] ** 2 - theta[1] ** 2)

    c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    info = {}
    th = tm.implicit_argmin(inner, torch.zeros(2, dtype=torch.float64), c, info=info)
    (th * torch.tensor([0.0, 1.0], dtype=torch.float64)).sum().backward()
    assert bool(info["cg"].negative_curvature.all())
    assert torch.isfinite(c.grad)
    info2 = {}
    th = tm.implicit_argmin(inner, torch.zeros(2, dtype=torch.float64), c, solver="normal_cg", ridge=1e-3, info=info2)
    (th * torch.tensor([0.0, 1.0], dtype=torch.float64)).sum().backward()
    assert not bool(info2["cg"].negative_curvature.any())  # H^2 + ridge is positive definite


def test_custom_argmin_decorator():
    X, y, inner, solution = ridge_problem(D=3)

    @tm.custom_argmin(inner, rtol=1e-13)
    def solve(lam, yy):
        """Solved with gradient-free code paths (the solver is never differentiated)."""
        assert not lam.requires_grad
        return solution(lam, yy)

    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (solve(lam, y) * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    lam2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (solution(lam2, y) * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    assert_tight(lam.grad, lam2.grad, rtol=1e-9)
    assert solve.__doc__.startswith("Solved")


def test_implicit_bad_input_and_double_backward():
    X, y, inner, solution = ridge_problem(D=3)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    th = solution(lam.detach(), y)
    with pytest.raises(ValueError, match="solver must be one of"):
        tm.implicit_argmin(inner, th, lam, y, solver="lu")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        tm.implicit_argmin(inner, th, lam, y, ridge=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        tm.implicit_argmin(inner, [], lam, y)
    with pytest.raises(TypeError, match="inner_loss must be callable"):
        tm.implicit_argmin(None, th, lam, y)
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        tm.implicit_argmin(inner, th, 0.3, y)
    with pytest.raises(ValueError, match="check_every"):
        tm.implicit_argmin(inner, th, lam, y, check_every=0)
    out = tm.implicit_argmin(inner, th, lam, y)
    g = torch.autograd.grad(out.sum(), lam, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        g.backward()


# ---------------------------------------------------------------- top-k and the QP layer


def test_soft_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 50, generator=g)
    for k in (1, 3):
        z = tt.soft_topk(scores, k)
        assert z.shape == scores.shape
        assert torch.allclose(z.sum(-1), torch.full((8,), float(k)), atol=1e-4)
        assert ((z >= -1e-6) & (z <= 1 + 1e-5)).all()
        # the soft membership ranks like the scores, and the top k hold most of the mass
        hard = tt.hard_topk(scores, k)
        assert ((z * hard).sum(-1) > 0.5 * k).all()
    # epsilon -> 0: hard top-k (scores on the scale of the cubic task's predictions)
    spread = torch.linspace(-2, 2, 10).repeat(2, 1)
    spread[1] = spread[1].flip(0)
    assert torch.allclose(tt.soft_topk(spread, 2, epsilon=1e-3, iters=500), tt.hard_topk(spread, 2), atol=0.02)
    s = scores.clone().requires_grad_(True)
    (tt.soft_topk(s, 1) * torch.randn(8, 50, generator=g)).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k must be in"):
        tt.soft_topk(scores, 50)


def test_project_simplex():
    v = randn(20, 7)
    w = tt.project_simplex(v)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(20, dtype=w.dtype))
    # optimality: <v - w, u - w> <= 0 for any u in the simplex (vertices suffice)
    for j in range(7):
        u = torch.zeros(7, dtype=w.dtype)
        u[j] = 1
        assert ((v - w) * (u - w)).sum(-1).max() <= 1e-12


def _random_qp(B=6, n=8, seed=0):
    G = randn(n, n, seed=seed)
    Q = G @ G.T / n + 0.2 * torch.eye(n, dtype=torch.float64)
    mu = randn(B, n, seed=seed + 1)
    return mu, Q


def test_simplex_qp_matches_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    mu, Q = _random_qp()
    w = tt.simplex_qp(mu, Q, iters=300)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(mu.shape[0], dtype=w.dtype))
    Qn = Q.numpy()
    for i in range(mu.shape[0]):
        m = mu[i].numpy()
        res = scipy_opt.minimize(lambda z: 0.5 * z @ Qn @ z - m @ z, x0=[1.0 / 8] * 8, jac=lambda z: Qn @ z - m,
                                 bounds=[(0, None)] * 8, constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1,
                                                                      "jac": lambda z: [1.0] * 8}],
                                 method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        obj = lambda z: 0.5 * z @ Qn @ z - m @ z  # noqa: E731
        assert obj(w[i].numpy()) <= obj(res.x) + 1e-10
        assert max_abs(w[i], torch.from_numpy(res.x)) < 1e-5


def test_simplex_qp_gradient_matches_finite_differences():
    mu, Q = _random_qp(B=4, n=6, seed=3)
    mu = mu.requires_grad_(True)
    g = randn(4, 6, seed=9)
    w = tt.simplex_qp(mu, Q, iters=400)
    (w * g).sum().backward()
    eps = 1e-6
    num = torch.zeros_like(mu)
    with torch.no_grad():
        for i in range(4):
            for j in range(6):
                mp, mm = mu.detach().clone(), mu.detach().clone()
                mp[i, j] += eps
                mm[i, j] -= eps
                num[i, j] = ((tt.simplex_qp(mp, Q, iters=400) - tt.simplex_qp(mm, Q, iters=400)) * g).sum() / (2 * eps)
    assert max_abs(mu.grad, num) < 1e-6


# ---------------------------------------------------------------- tasks and examples


def test_cubic_task_is_as_specified():
    task = tt.CubicTopK(0)
    assert task.x_train.shape == (200, 50, 1) and task.x_val.shape == (200, 50, 1) and task.x_test.shape == (400, 50, 1)
    assert task.x_train.min() >= -1 and task.x_train.max() <= 1
    assert torch.allclose(task.y_train, 10 * (task.x_train.squeeze(-1) ** 3 - 0.65 * task.x_train.squeeze(-1)))
    assert abs(float(task.decision_quality(task.y_test, task.y_test)) - 1.0) < 1e-6
    assert float(task.decision_quality(-task.y_test, task.y_test)) < -0.5
    assert abs(float(task.decision_quality(torch.rand(task.y_test.shape), task.y_test))) < 0.15
    # The least-squares line has a negative slope on [-1, 1]: MSE picks poor items.
    x = task.x_train.flatten()
    slope = ((x - x.mean()) * (task.y_train.flatten())).sum() / (x - x.mean()).square().sum()
    assert -0.6 < slope < -0.4


def test_portfolio_task_decisions():
    task = tt.FactorPortfolio(0, n_train=40, n_test=40)
    assert task.x_train.shape == (20, 50, 5) and task.y_test.shape == (40, 50)
    assert abs(float(task.decision_quality(task.y_test, task.y_test)) - 1.0) < 1e-6
    w = task.decide(task.y_test)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(40))
    assert (torch.linalg.eigvalsh(task.sigma) > 0).all()


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_cubic_short(tmp_path, capsys):
    """A short run of examples/taskmet_cubic.py: TaskMet flips the sign of the MSE line's slope."""
    res = _load_example("taskmet_cubic").main(["--seeds", "0", "--outer-steps", "25", "--plot",
                                               str(tmp_path / "cubic.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert "mean" in out and (tmp_path / "cubic.png").stat().st_size > 10_000
    assert res["mse"][0] < -0.5
    assert res["taskmet"][0] > 0.5
    assert res["models"][0]["history"]["cg_iterations"][0] <= 3  # 2 parameters: CG needs 2 steps


def test_example_portfolio_short(capsys):
    res = _load_example("taskmet_portfolio").main(["--seeds", "0", "--outer-steps", "2", "--inner-steps", "5",
                                                   "--inner-steps-init", "20", "--mse-steps", "20", "--no-progress"])
    assert "mean" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in res["mse"] + res["taskmet"])


@pytest.mark.slow
def test_cubic_targets_over_five_seeds():
    """The issue's target with the defaults: TaskMet DQ >= 0.9 and MSE <= -0.5, mean of 5 seeds."""
    res = tt.compare("cubic", seeds=(0, 1, 2, 3, 4), progress=False)
    assert sum(res["taskmet"]) / 5 >= 0.9, res["taskmet"]
    assert sum(res["mse"]) / 5 <= -0.5, res["mse"]


def test_trainer_implicit_gradient_matches_exact_on_the_cubic_task():
    """The trainer's inner problem (the Mahalanobis loss of the linear predictor over the training
    items, as a function of the metric network's parameters): the CG implicit gradient equals
    the exact-Hessian one, at an inner solution converged by the closed form."""
    task = tt.CubicTopK(0, n_train=40, n_test=10, dtype=torch.float64)
    torch.manual_seed(0)
    pred, metric = task.make_predictor(), task.make_metric()
    trainer = tm.TaskMetTrainer(task)
    inner = trainer.inner_loss(pred, metric)
    with torch.no_grad():  # weighted least squares in closed form
        x = task.x_train.reshape(-1)
        w = metric(x.unsqueeze(-1)).reshape(-1).square() + metric.identity_weight()
        F = torch.stack([x, torch.ones_like(x)], dim=-1)
        a, b = torch.linalg.solve(F.T @ (F * w[:, None]), (F * w[:, None]).T @ task.y_train.reshape(-1))
    theta = (a.reshape(1, 1), b.reshape(1))
    phi = list(metric.parameters())
    grads = {}
    for solver in ("cg", "exact"):
        th = tm.implicit_argmin(inner, theta, *phi, solver=solver, rtol=1e-12)
        out = torch.func.functional_call(pred, {"0.weight": th[0], "0.bias": th[1]}, (task.x_train,))
        grads[solver] = torch.autograd.grad(task.task_loss(out, task.y_train), phi)
    for g1, g2 in zip(grads["cg"], grads["exact"]):
        assert_tight(g1, g2, rtol=1e-8, atol=1e-14)
    assert any(g.abs().max() > 0 for g in grads["cg"])


def test_trainer_runs_with_the_diagonal_metric():
    task = tt.CubicTopK(1, n_train=40, n_test=20)
    torch.manual_seed(1)
    pred = task.make_predictor()
    metric = tm.DiagonalMetricNet(1, 1, hidden=16, eps=0.1)
    cfg = tm.TaskMetConfig(outer_steps=3, inner_steps_init=50, inner_steps=10, outer_batch=10, val_every=1,
                           outer_lr=1e-2)
    trainer = tm.TaskMetTrainer(task, cfg)
    hist = trainer.fit_taskmet(pred, metric)
    assert len(hist["outer_loss"]) == 3 and len(hist["val_dq"]) == 3
    assert all(math.isfinite(v) for v in hist["outer_loss"])
    assert hist["cg_iterations"] and max(hist["cg_iterations"]) <= 3
    with pytest.raises(ValueError, match="implicit_solver"):
        tm.TaskMetTrainer(task, tm.TaskMetConfig(implicit_solver="lu"))

"""Benchmark cases of the cg / taskmet family.

- cg_dense: batched dense CG (the compiled kernel) against torch.linalg.solve and
  torch.linalg.cholesky + cholesky_solve on the same batch, and our PyTorch reference loop.
- cg_matrix_free: matrix-free CG iterations on the cheapest operator (a diagonal), so that the
  cost is CG's own vector work: the fused update op against a torchopt-style loop (a
  Python `while` on a tensor condition and scalar step sizes: host synchronisations every
  iteration) and against our reference update (PyTorch ops, no synchronisation). Host
  synchronisations per iteration, counted, are in the case description.
- implicit_vs_unrolled: one outer gradient of the cubic task's TaskMet step: K inner gradient
  steps then the implicit gradient (CG over Hessian-vector products) against differentiating
  through the K steps (memory grows with K).
- mahalanobis: the fused Mahalanobis loss against the authors' explicit form
  err^T (L L^T + c I) err with Lambda formed by bmm.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import Case, register

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HostSyncCounter(TorchDispatchMode):
    """Counts device-to-host value transfers: every `.item()`, `bool(tensor)`, tensor used as a
    Python scalar goes through aten::_local_scalar_dense."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(fn) -> int:
    with HostSyncCounter() as counter:
        fn()
    return counter.count


# ---------------------------------------------------------------- dense CG


def spd_batch(size: dict, device, seed=0):
    """SPD batch: G G^T / (2n) + I (Marchenko-Pastur spectrum in [1.09, 3.9], cond ~ 3.6), or with
    size["cond"] eigenvalues log-spaced in [1, cond] under a random rotation."""
    g = torch.Generator().manual_seed(seed)
    S, n = size["S"], size["n"]
    dtype = DTYPES[size.get("dtype", "float32")]
    cond = size.get("cond")
    if cond is None:
        G = torch.randn(S, n, 2 * n, generator=g, dtype=dtype)
        A = torch.baddbmm(torch.eye(n, dtype=dtype).expand(S, n, n), G, G.mT, alpha=1.0 / (2 * n))
    else:
        Q, _ = torch.linalg.qr(torch.randn(S, n, n, generator=g, dtype=dtype))
        ev = torch.logspace(0, float(torch.log10(torch.tensor(float(cond)))), n, dtype=dtype)
        A = (Q * ev) @ Q.mT
        A = 0.5 * (A + A.mT)
    b = torch.randn(S, n, size.get("k", 1), generator=g, dtype=dtype)
    return A.to(device).contiguous(), b.to(device)


def _dense(kind):
    def setup(size, device):
        A, b = spd_batch(size, device)
        rtol = size.get("rtol", 1e-6)
        if kind == "ours":
            import structloss_fast as slf

            return lambda: slf.cg(A, b, rtol=rtol)
        if kind == "reference":
            import structloss_fast as slf

            return lambda: slf.cg(A, b, rtol=rtol, backend="reference")
        if kind == "solve":
            return lambda: torch.linalg.solve(A, b)
        if kind == "cholesky":
            return lambda: torch.cholesky_solve(b, torch.linalg.cholesky(A))
        raise ValueError(kind)

    return setup


def dense_skip(provider, size, device):
    if provider == "reference_loop" and size["S"] == 1024:
        return "the PyTorch reference loop is measured at the --full sizes (default suite time)"
    if device == "cpu" and size["S"] * size["n"] ** 2 * 4 * 4 > 6 * 2**30:
        return "inputs need more than 6 GB"
    return None


register(Case(
    family="taskmet",
    name="cg_dense",
    description="batched dense CG to rtol 1e-6 (A = G G^T/2n + I unless cond is given) vs LU and Cholesky solves",
    providers={
        "structloss_fast": _dense("ours"),
        "torch.linalg.solve": _dense("solve"),
        "cholesky_solve": _dense("cholesky"),
        "reference_loop": _dense("reference"),
    },
    sizes=[{"S": 1024, "n": 64, "dtype": "float32"}],
    full_sizes=[
        {"S": 4096, "n": 64, "dtype": "float32"},
        {"S": 4096, "n": 64, "dtype": "float32", "cond": 100},
        {"S": 4096, "n": 64, "dtype": "float32", "k": 8},
        {"S": 64, "n": 1024, "dtype": "float32"},
        {"S": 4096, "n": 64, "dtype": "float64", "rtol": 1e-10},
    ],
    reference_points=("reference_loop",),
    skip=dense_skip,
    mode="forward",
))


# ---------------------------------------------------------------- matrix-free CG


def diagonal_operator(n: int, dtype=torch.float32, device="cpu", cond: float = 1e3):
    """p -> d * p with d log-spaced in [1 / cond, 1]: the cheapest SPD operator (one multiply), so
    that the per-iteration cost measured is CG's own vector work; slow convergence (cond 1e3)
    keeps every provider iterating for the whole run."""
    d = torch.logspace(-float(torch.log10(torch.tensor(cond))), 0.0, n, dtype=torch.float64).to(device=device, dtype=dtype)
    d = d[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    return lambda p: d * p


def torchopt_style_cg(A, b, *, maxiter: int, rtol: float = 1e-5, atol: float = 0.0):
    """The loop structure of torchopt.linalg.cg (single right-hand side): a Python while on a
    tensor comparison, and step sizes passed as Python scalars (alpha=tensor): three host
    synchronisations per iteration. Written here from the algorithm, for the benchmark."""
    b2 = torch.dot(b, b)
    atol2 = torch.clamp(rtol ** 2 * b2, min=atol ** 2)
    x = torch.zeros_like(b)
    r = b - A(x)
    p = r
    gamma = torch.dot(r, r)
    k = 0
    while bool(gamma > atol2) and k < maxiter:
        Ap = A(p)
        alpha = gamma / torch.dot(p, Ap)
        x = x.add(p, alpha=alpha)
        r = r.sub(Ap, alpha=alpha)
        gamma_new = torch.dot(r, r)
        beta = gamma_new / gamma
        p = r.add(p, alpha=beta)
        gamma = gamma_new
        k += 1
    return x


def _matfree(kind):
    def setup(size, device):
        n, iters = size["n"], size["iters"]
        dtype = DTYPES[size.get("dtype", "float32")]
        b = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
        op = diagonal_operator(n, dtype, device)
        import structloss_fast as slf

        # rtol = 0: every provider runs exactly `iters` iterations.
        if kind == "ours":
            return lambda: slf.cg(op, b, rtol=0.0, maxiter=iters, check_every=10**9)
        if kind == "reference":
            return lambda: slf.cg(op, b, rtol=0.0, maxiter=iters, check_every=10**9, backend="reference")
        if kind == "torchopt_style":
            return lambda: torchopt_style_cg(op, b, maxiter=iters, rtol=0.0)
        raise ValueError(kind)

    return setup


def _sync_counts() -> str:
    """Host synchronisations per iteration of each matrix-free provider, counted on a tiny run."""
    try:
        import structloss_fast as slf

        b = torch.randn(64)
        op = diagonal_operator(64)
        ours = count_host_syncs(lambda: slf.cg(op, b, rtol=0.0, maxiter=20, check_every=10**9))
        peer = count_host_syncs(lambda: torchopt_style_cg(op, b, maxiter=20, rtol=0.0))
        return f"host syncs per iteration (counted): structloss_fast {ours / 20:g}, torchopt_style {peer / 20:g}"
    except Exception as exc:  # pragma: no cover - the description must not break the suite
        return f"host syncs not counted ({type(exc).__name__})"


register(Case(
    family="taskmet",
    name="cg_matrix_free",
    description="matrix-free CG, `iters` iterations of a diagonal operator (cond 1e3) on n unknowns (fp32); "
                + _sync_counts(),
    providers={
        "structloss_fast": _matfree("ours"),
        "torchopt_style": _matfree("torchopt_style"),
        "reference_update": _matfree("reference"),
    },
    sizes=[{"n": 100_000, "iters": 50}],
    full_sizes=[{"n": 10_000, "iters": 200}, {"n": 1_000_000, "iters": 50}, {"n": 10_000_000, "iters": 20}],
    reference_points=("reference_update",),
    mode="forward",
))


# ---------------------------------------------------------------- implicit vs unrolled


def _cubic_step(kind):
    """One outer gradient of TaskMet on the cubic task (200 training instances x 50 items, the
    authors' metric network): K inner gradient-descent steps on the Mahalanobis loss from a
    warm start, then the gradient of the soft top-1 task loss (Sinkhorn, 200 iterations, 50
    instances) with respect to the metric network's parameters."""

    def setup(size, device):
        from ..taskmet import implicit_argmin, unrolled_argmin
        from ..taskmet.tasks import CubicTopK

        torch.manual_seed(0)
        task = CubicTopK(0)
        metric = task.make_metric()
        phi = list(metric.parameters())
        names = [n for n, _ in metric.named_parameters()]
        x = task.x_train.reshape(-1)
        y = task.y_train.reshape(-1)
        K, lr = size["K"], 0.05

        def weights(params):
            named = dict(zip(names, params))
            L = torch.func.functional_call(metric, named, (x.unsqueeze(-1),))
            return L.reshape(-1).square() + named["log_identity"].exp()  # Lambda(x) = L^2 + exp(c)

        def inner_w(theta, w):
            a, b = theta
            return (w * (a * x + b - y).square()).mean()

        def inner(theta, *params):
            return inner_w(theta, weights(params))

        theta0 = (torch.tensor(0.3), torch.tensor(0.0))

        def outer_loss(theta):
            a, b = theta
            pred = a * task.x_train[:50].squeeze(-1) + b
            return task.task_loss(pred, task.y_train[:50])

        def run():
            if kind == "unrolled":
                w = weights(phi)  # the metric once; the K steps are differentiated through
                theta = unrolled_argmin(inner_w, theta0, w, steps=K, lr=lr)
            else:
                with torch.no_grad():
                    w = weights(phi)
                th = [t.clone().requires_grad_(True) for t in theta0]
                for _ in range(K):  # the same K steps, without a graph
                    g = torch.autograd.grad(inner_w(tuple(th), w), th)
                    th = [(t - lr * gi).detach().requires_grad_(True) for t, gi in zip(th, g)]
                theta = implicit_argmin(inner, tuple(t.detach() for t in th), *phi, solver=kind, ridge=1e-5)
            return torch.autograd.grad(outer_loss(theta), phi, allow_unused=True)

        return run

    return setup


register(Case(
    family="taskmet",
    name="implicit_vs_unrolled",
    description="one TaskMet outer gradient on the cubic task: K inner GD steps + implicit CG vs backprop through K steps",
    providers={
        "structloss_fast": _cubic_step("cg"),
        "structloss_fast:normal_cg": _cubic_step("normal_cg"),
        "unrolled": _cubic_step("unrolled"),
    },
    sizes=[{"K": 50}],
    full_sizes=[{"K": 100}, {"K": 500}, {"K": 2000}],
    ours=("structloss_fast", "structloss_fast:normal_cg"),
    devices=("cpu",),  # the task lives on the CPU
    skip=lambda provider, size, device: ("normal_cg is measured at the --full sizes (default suite time)"
                                         if provider == "structloss_fast:normal_cg" and size["K"] == 50 else None),
    mode="forward+backward",
))


# ---------------------------------------------------------------- Mahalanobis loss


def _mahalanobis(kind):
    def setup(size, device):
        B, n = size["B"], size["n"]
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(B, n, generator=g).to(device).requires_grad_(True)
        target = torch.randn(B, n, generator=g).to(device)
        L = torch.randn(B, n, size.get("r", n), generator=g).to(device).requires_grad_(True)
        c = torch.tensor(0.5, device=device, requires_grad=True)
        if kind == "ours":
            from ..taskmet import mahalanobis_loss

            def run():
                loss = mahalanobis_loss(pred, target, L, eps=c)
                loss.backward()
                pred.grad = L.grad = c.grad = None
        else:  # the authors' form: A = L L^T + c I formed, then err^T A err
            eye = torch.eye(n, device=device)

            def run():
                A = torch.bmm(L, L.transpose(1, 2)) + c * eye.repeat(B, 1, 1)
                err = (pred - target).view(B, n, 1)
                loss = (err.transpose(1, 2) @ A @ err).mean()
                loss.backward()
                pred.grad = L.grad = c.grad = None

        return run

    return setup


register(Case(
    family="taskmet",
    name="mahalanobis",
    description="Mahalanobis loss with a per-sample factor L (B, n, r), forward+backward: fused vs Lambda formed",
    providers={"structloss_fast": _mahalanobis("ours"), "explicit_lambda": _mahalanobis("explicit")},
    sizes=[{"B": 1024, "n": 50}],
    full_sizes=[{"B": 4096, "n": 50}, {"B": 4096, "n": 100}, {"B": 4096, "n": 256, "r": 8}],
))

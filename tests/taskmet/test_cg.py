"""Conjugate gradients: every backend against torch.linalg.solve / cholesky_solve and against the
reference (the definition), per-column masks and statuses, preconditioning, ridge, zero and
non-finite right-hand sides, indefinite A, host synchronisations, gradients, custom-op
registration and bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

import structloss_fast as slf
from structloss_fast import _ext
from structloss_fast.bench.taskmet import HostSyncCounter, torchopt_style_cg
from structloss_fast.taskmet import reference as ref
from tests.helpers import assert_tight, fast_backends, max_abs

DENSE = [("reference", torch.device("cpu"))] + fast_backends("cg_dense", ("cpu", "cuda"))
DENSE_IDS = [f"{b}-{d.type}" for b, d in DENSE]
OPERATOR = [("reference", torch.device("cpu"))] + fast_backends("cg_update", ("cpu", "cuda"))
OPERATOR_IDS = [f"{b}-{d.type}" for b, d in OPERATOR]


def spd(S, n, *, dtype=torch.float64, cond=None, seed=0, batch=None):
    """Random SPD batch: Wishart + I (well conditioned), or Q diag(logspace(0, log10 cond)) Q^T."""
    g = torch.Generator().manual_seed(seed)
    shape = (S,) if batch is None else batch
    if cond is None:
        G = torch.randn(*shape, n, 2 * n, generator=g, dtype=torch.float64)
        A = G @ G.mT / (2 * n) + torch.eye(n, dtype=torch.float64)
    else:
        Q, _ = torch.linalg.qr(torch.randn(*shape, n, n, generator=g, dtype=torch.float64))
        ev = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
        A = Q @ torch.diag_embed(ev.expand(*shape, n)) @ Q.mT
        A = 0.5 * (A + A.mT)
    return A.to(dtype)


def rhs(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def op_of(A):
    return lambda p: (A @ p.unsqueeze(-1)).squeeze(-1)


def on(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


# ---------------------------------------------------------------- parity with torch.linalg


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
@pytest.mark.parametrize("S,n,k", [(6, 1, None), (5, 17, None), (3, 40, 4), (1, 64, None), (9, 8, 1)])
def test_float64_matches_linalg_solve(backend, device, S, n, k):
    A = spd(S, n)
    b = rhs(S, n) if k is None else rhs(S, n, k)
    res = slf.cg(*on(device, A, b), rtol=1e-13, backend=backend)
    expected = torch.linalg.solve(A, b)
    assert res.x.shape == b.shape
    assert res.converged.all()
    assert not res.negative_curvature.any()
    assert_tight(res.x.cpu(), expected, rtol=1e-10, what="x")
    col_shape = (S,) if k is None else (S, k)
    assert res.iterations.shape == col_shape and res.iterations.dtype == torch.int64
    assert (res.residual_norm.cpu() <= 1e-13 * torch.linalg.vector_norm(b, dim=-2 if k else -1)).all()


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_float64_matches_cholesky_solve_and_true_residual(backend, device):
    A, b = spd(7, 30, cond=1e3), rhs(7, 30, 2)
    res = slf.cg(*on(device, A, b), rtol=1e-12, backend=backend)
    expected = torch.cholesky_solve(b, torch.linalg.cholesky(A))
    assert_tight(res.x.cpu(), expected, rtol=1e-8, what="x")
    true_residual = torch.linalg.vector_norm(b - A @ res.x.cpu(), dim=-2)
    assert (true_residual <= 1e-10 * torch.linalg.vector_norm(b, dim=-2)).all()


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_float32_close_to_float64_solution(backend, device):
    A64, b64 = spd(16, 48), rhs(16, 48)
    truth = torch.linalg.solve(A64, b64)
    res = slf.cg(*on(device, A64.float(), b64.float()), rtol=1e-6, backend=backend)
    assert res.converged.all()
    rel = (torch.linalg.vector_norm(res.x.cpu().double() - truth, dim=-1) / torch.linalg.vector_norm(truth, dim=-1))
    # cond(A) ~ 4 here: the error is a small multiple of rtol, as for torch.linalg.solve in fp32.
    torch_rel = (torch.linalg.vector_norm(torch.linalg.solve(A64.float(), b64.float()).double() - truth, dim=-1)
                 / torch.linalg.vector_norm(truth, dim=-1))
    assert rel.max() <= 20 * 1e-6 + 2 * torch_rel.max(), (rel.max(), torch_rel.max())


@pytest.mark.parametrize("backend,device", DENSE[1:], ids=DENSE_IDS[1:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("precond", [None, "diag", "dense"])
def test_kernel_matches_reference(backend, device, dtype, precond):
    A, b = spd(11, 23, cond=50, dtype=dtype), rhs(11, 23, 3, dtype=dtype)
    x0 = rhs(11, 23, 3, dtype=dtype, seed=5)
    M = None
    if precond == "diag":
        M = 1.0 / torch.diagonal(A, dim1=-2, dim2=-1)
    elif precond == "dense":
        M = torch.linalg.inv(A + 0.1 * torch.eye(23, dtype=dtype)) + 0.01 * torch.eye(23, dtype=dtype)
        M = 0.5 * (M + M.mT)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    kw = dict(rtol=rtol, ridge=0.3, x0=x0, M=M)
    out = slf.cg(*on(device, A, b), **{**kw, "x0": x0.to(device), "M": None if M is None else M.to(device)},
                 backend=backend)
    exp = slf.cg(A, b, **kw, backend="reference")
    # float32 loses conjugacy after ~n steps: the two summation orders may then need a few
    # more or fewer iterations; float64 agrees to one.
    slack = 1 if dtype == torch.float64 else 3
    assert (out.iterations.cpu() - exp.iterations).abs().max() <= slack
    assert torch.equal(out.converged.cpu(), exp.converged)
    tol = 1e-8 if dtype == torch.float64 else 2e-4
    assert max_abs(out.x, exp.x) <= tol * exp.x.abs().max()


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_multiple_rhs_have_their_own_recurrences(backend, device):
    n = 20
    A = spd(2, n)
    evals, evecs = torch.linalg.eigh(A)
    b = torch.stack([evecs[:, :, 0], rhs(2, n), evecs[:, :, 3] + evecs[:, :, 5]], dim=-1)  # (2, n, 3)
    res = slf.cg(*on(device, A, b), rtol=1e-12, backend=backend)
    assert res.iterations.shape == (2, 3)
    it = res.iterations.cpu()
    assert (it[:, 0] == 1).all()  # an eigenvector: one step
    assert (it[:, 2] == 2).all()  # two eigenvectors: two steps
    assert (it[:, 1] > 5).all()
    for c in range(3):  # each column equals its own single-RHS solve
        single = slf.cg(*on(device, A, b[..., c]), rtol=1e-12, backend=backend)
        assert_tight(res.x[..., c].cpu(), single.x.cpu(), rtol=1e-11)
        assert torch.equal(res.iterations[..., c].cpu(), single.iterations.cpu())


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_jacobi_preconditioning_cuts_iterations(backend, device):
    n = 40
    A = spd(4, n)
    scale = torch.logspace(0, 3, n, dtype=torch.float64)
    A = scale.sqrt()[:, None] * A * scale.sqrt()[None, :]  # badly scaled
    b = rhs(4, n)
    plain = slf.cg(*on(device, A, b), rtol=1e-10, backend=backend)
    jac = slf.cg(*on(device, A, b), M="jacobi", rtol=1e-10, backend=backend)
    diag = slf.cg(*on(device, A, b), M=(1 / torch.diagonal(A, dim1=-2, dim2=-1)).to(device), rtol=1e-10,
                  backend=backend)
    exact = torch.linalg.solve(A, b)
    for r in (plain, jac, diag):
        assert r.converged.all()
        assert_tight(r.x.cpu(), exact, rtol=1e-7)
    assert (jac.iterations < plain.iterations).all()
    assert torch.equal(jac.iterations, diag.iterations)
    # The exact inverse as a dense M: one step.
    inv = slf.cg(*on(device, A, b), M=torch.linalg.inv(A).to(device), rtol=1e-8, backend=backend)
    assert (inv.iterations <= 2).all()


def test_callable_preconditioner_runs_on_the_reference_and_cpu_refuses_it():
    A, b = spd(3, 12), rhs(3, 12)
    d = 1 / torch.diagonal(A, dim1=-2, dim2=-1)
    res = slf.cg(A, b, M=lambda r: d * r, rtol=1e-12)
    assert_tight(res.x, torch.linalg.solve(A, b), rtol=1e-10)
    # a dense M with a callable A runs on the reference update
    Minv = torch.linalg.inv(A)
    res = slf.cg(op_of(A), b, M=Minv, rtol=1e-12)
    assert_tight(res.x, torch.linalg.solve(A, b), rtol=1e-10)
    assert (res.iterations <= 2).all()
    with pytest.raises(slf.BackendUnavailable, match="callable preconditioner"):
        slf.cg(A, b, M=lambda r: d * r, backend="cpu")
    with pytest.raises(slf.BackendUnavailable, match="diagonal"):
        slf.cg(op_of(A), b, M=lambda r: d * r, backend="cpu")


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_ridge(backend, device):
    A, b = spd(5, 15, cond=1e4), rhs(5, 15)
    res = slf.cg(*on(device, A, b), ridge=0.7, rtol=1e-13, backend=backend)
    assert_tight(res.x.cpu(), torch.linalg.solve(A + 0.7 * torch.eye(15, dtype=A.dtype), b), rtol=1e-10)


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_zero_rhs_returns_zero_at_once(backend, device):
    A, b = spd(4, 10), rhs(4, 10, 2)
    b[1] = 0.0
    b[2, :, 1] = 0.0
    x0 = rhs(4, 10, 2, seed=9)  # a nonzero initial guess is ignored for a zero column
    res = slf.cg(*on(device, A, b, x0)[:2], x0=x0.to(device), rtol=1e-10, backend=backend)
    x = res.x.cpu()
    assert torch.equal(x[1], torch.zeros(10, 2, dtype=x.dtype))
    assert torch.equal(x[2, :, 1], torch.zeros(10, dtype=x.dtype))
    assert res.iterations[1].eq(0).all() and res.iterations[2, 1] == 0
    assert res.converged.all()
    assert res.residual_norm[1].eq(0).all()
    assert res.iterations[0].gt(0).all()


@pytest.mark.parametrize("backend,device", DENSE + OPERATOR[1:], ids=DENSE_IDS + [f"op-{i}" for i in OPERATOR_IDS[1:]])
def test_indefinite_matrix_is_flagged_and_best_iterate_kept(backend, device):
    n = 12
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(1, 5, n, dtype=torch.float64).repeat(3, 1)
    ev[:, :3] = torch.tensor([-2.0, -1.0, -0.5], dtype=torch.float64)  # indefinite
    A = Q @ torch.diag_embed(ev) @ Q.mT
    A = 0.5 * (A + A.mT)
    b = rhs(3, n)
    A_, b_ = on(device, A, b)
    res = slf.cg(A_, b_, rtol=1e-12, maxiter=200, backend=backend)
    assert res.negative_curvature.all()
    assert not res.converged.any()
    assert torch.isfinite(res.x).all()
    assert (res.iterations < 200).all()
    # The kept iterate minimises the quadratic over the explored space: below its value at 0.
    x = res.x.cpu()
    phi = 0.5 * (x * (A @ x.unsqueeze(-1)).squeeze(-1)).sum(-1) - (b * x).sum(-1)
    assert (phi < 0).all()
    ref_res = slf.cg(A, b, rtol=1e-12, maxiter=200, backend="reference")
    assert torch.equal(res.iterations.cpu(), ref_res.iterations)
    assert_tight(x, ref_res.x, rtol=1e-9)


@pytest.mark.parametrize("backend,device", OPERATOR, ids=OPERATOR_IDS)
def test_indefinite_operator_is_flagged(backend, device):
    A = -spd(2, 6)  # negative definite: the very first step has p^T A p < 0
    b = rhs(2, 6)
    res = slf.cg(op_of(A.to(device)), b.to(device), backend=backend)
    assert res.negative_curvature.all() and (res.iterations == 0).all()
    assert torch.equal(res.x.cpu(), torch.zeros_like(b))


@pytest.mark.parametrize("backend,device", DENSE + OPERATOR[1:], ids=DENSE_IDS + [f"op-{i}" for i in OPERATOR_IDS[1:]])
def test_early_converging_system_is_frozen(backend, device):
    n = 30
    A = torch.stack([torch.eye(n, dtype=torch.float64) * 3.0, spd(1, n, cond=1e3)[0]])
    b = rhs(2, n)
    A_, b_ = on(device, A, b)
    res = slf.cg(A_, b_, rtol=1e-12, backend=backend)
    it = res.iterations.cpu()
    assert it[0] == 1 and it[1] > 10
    alone = slf.cg(A_[:1], b_[:1], rtol=1e-12, backend=backend)
    assert torch.equal(alone.iterations.cpu()[0], it[0])
    assert_tight(res.x[0].cpu(), alone.x[0].cpu(), rtol=1e-14)
    assert_tight(res.x[0].cpu(), b[0] / 3.0, rtol=1e-14)


@pytest.mark.parametrize("backend,device", OPERATOR, ids=OPERATOR_IDS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matrix_free_matches_dense_reference(backend, device, k, dtype):
    A = spd(4, 25, cond=30, dtype=dtype)
    b = rhs(4, 25, dtype=dtype) if k is None else rhs(4, 25, k, dtype=dtype)
    d = 1 / torch.diagonal(A, dim1=-2, dim2=-1)
    A_, b_, d_ = on(device, A, b, d)
    if k is None:
        operator = op_of(A_)
    else:
        def operator(p):
            return A_ @ p
    rtol = 1e-11 if dtype == torch.float64 else 1e-5
    for M in (None, d_):
        out = slf.cg(operator, b_, M=M, rtol=rtol, multi_rhs=k is not None, backend=backend)
        exp = slf.cg(A, b, M=None if M is None else d, rtol=rtol, backend="reference")
        assert (out.iterations.cpu() - exp.iterations).abs().max() <= (1 if dtype == torch.float64 else 3)
        assert out.converged.all()
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        assert max_abs(out.x, exp.x) <= tol * exp.x.abs().max()


def test_update_op_matches_reference_step():
    S, n, k = 3, 20000, 2  # several chunks per column
    g = torch.Generator().manual_seed(0)
    diag = torch.rand(S, n, 1, generator=g, dtype=torch.float64) + 0.5
    prec = 1 / diag.squeeze(-1) * 0.9

    def operator(p):
        return diag * p

    b = torch.randn(S, n, k, generator=g, dtype=torch.float64)
    for M in (None, prec):
        apply_M = None if M is None else (lambda r: M.unsqueeze(-1) * r)
        state = ref.init_state(operator, b, None, apply_M, 1e-9, 0.0)
        mine = [t.clone() for t in state]
        for _ in range(25):
            x, r, p, rz, rn, tol, it, st = mine
            torch.ops.structloss_fast.cg_update(x, r, p, operator(p), M, rz, rn, tol, it, st)
            state = ref.step(state, operator(state[2]), apply_M)
            for a, e in zip(mine, state):
                assert max_abs(a.double() if a.is_floating_point() else a, e.double() if e.is_floating_point() else e) \
                    <= 1e-12 * max(1.0, e.double().abs().max().item())


@pytest.mark.parametrize("backend,device", OPERATOR, ids=OPERATOR_IDS)
def test_matrix_free_host_syncs(backend, device, monkeypatch):
    """check_every >= maxiter: not one host synchronisation in the loop; otherwise one per
    check_every iterations. Counted at the dispatcher: every tensor-to-Python value transfer
    (.item(), bool(t), a tensor used as a Python scalar, also from C++) is an
    aten::_local_scalar_dense call; on CUDA, explicit synchronize calls are counted too."""
    A, b = spd(3, 40, cond=1e6), rhs(3, 40)
    A_, b_ = on(device, A, b)
    operator = op_of(A_)
    syncs = []
    if torch.cuda.is_available():
        orig_sync = torch.cuda.synchronize
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (syncs.append(1), orig_sync(*a, **k)))
    with HostSyncCounter() as counter:
        res = slf.cg(operator, b_, rtol=1e-14, maxiter=60, check_every=10**9, backend=backend)
    assert counter.count == 0 and not syncs
    assert (res.iterations == 60).all()  # ran all 60 iterations without asking the host
    with HostSyncCounter() as counter:
        slf.cg(operator, b_, rtol=1e-14, maxiter=60, check_every=7, backend=backend)
    assert counter.count == 59 // 7 and not syncs
    # The counter does see the syncs of a torchopt-style loop (several per iteration).
    with HostSyncCounter() as counter:
        torchopt_style_cg(lambda p: A[0] @ p, b[0], maxiter=10, rtol=0.0)
    assert counter.count >= 3 * 10


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_dense_loop_has_no_host_sync(backend, device):
    A, b = spd(3, 20), rhs(3, 20)
    A_, b_ = on(device, A, b)
    with HostSyncCounter() as counter:
        slf.cg(A_, b_, maxiter=30, check_every=1000, backend=backend)
    assert counter.count == 0


def test_maxiter_zero_and_not_converged_reporting():
    A, b = spd(2, 10, cond=1e4), rhs(2, 10)
    x0 = rhs(2, 10, seed=4)
    res = slf.cg(A, b, x0=x0, maxiter=0)
    assert torch.equal(res.x, x0) and (res.iterations == 0).all() and not res.converged.any()
    short = slf.cg(A, b, maxiter=3)
    assert (short.iterations == 3).all() and not short.converged.any()
    with pytest.raises(slf.CGNotConverged, match="2 of 2"):
        slf.cg(A, b, maxiter=3, raise_on_fail=True)
    with pytest.warns(slf.CGWarning, match="did not converge"):
        slf.cg(A, b, maxiter=3, warn_on_fail=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slf.cg(A, b, warn_on_fail=True, raise_on_fail=True)  # converged: silent


def test_default_maxiter_is_ten_n():
    A, b = spd(1, 7, cond=1e8), rhs(1, 7)
    res = slf.cg(A, b, rtol=0.0)  # unreachable tolerance in floating point: runs to maxiter
    assert res.iterations.item() <= 70
    scalar_like = slf.cg(torch.full((1, 1), 2.0, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert scalar_like.converged.item() and scalar_like.x.item() == 0.5


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_non_finite_input_gives_non_finite_x(backend, device):
    A, b = spd(3, 8), rhs(3, 8)
    A[0, 2, 3] = A[0, 3, 2] = float("nan")
    b[1, 4] = float("inf")
    res = slf.cg(*on(device, A, b), backend=backend)
    x = res.x.cpu()
    assert torch.isnan(x[0]).all() and torch.isnan(x[1]).all()
    assert torch.isfinite(x[2]).all() and res.converged[2]
    assert not res.converged[0] and not res.converged[1]


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_empty_and_broadcast_and_non_contiguous(backend, device):
    A = spd(1, 6)[0]
    empty = slf.cg(*on(device, A, torch.zeros(0, 6, 1, dtype=A.dtype)), multi_rhs=True, backend=backend)
    assert empty.x.shape == (0, 6, 1) and empty.iterations.shape == (0, 1)
    # One A for a batch of right-hand sides given as columns, and a broadcast batch.
    b = rhs(6, 5)
    res = slf.cg(*on(device, A, b), rtol=1e-13, backend=backend)
    assert_tight(res.x.cpu(), torch.linalg.solve(A, b), rtol=1e-10)
    Ab = spd(4, 6)
    bb = rhs(6)  # shared right-hand side
    res = slf.cg(*on(device, Ab, bb), rtol=1e-13, backend=backend)
    assert res.x.shape == (4, 6)
    assert_tight(res.x.cpu(), torch.linalg.solve(Ab, bb.expand(4, 6)), rtol=1e-10)
    # Non-contiguous A (a transposed view of a symmetric batch) and b (a strided slice).
    At = spd(3, 9).mT
    bs = rhs(3, 18)[:, ::2]
    res = slf.cg(*on(device, At, bs), rtol=1e-13, backend=backend)
    assert_tight(res.x.cpu(), torch.linalg.solve(At, bs), rtol=1e-10)


def test_cpu_is_deterministic_across_threads():
    A, b = spd(64, 32, dtype=torch.float32), rhs(64, 32, 2, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            outs.append(slf.cg(A, b, rtol=1e-6, backend="cpu").x)
            outs.append(slf.cg(lambda p: A @ p, b, multi_rhs=True, rtol=1e-6, backend="cpu").x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_auto_uses_the_compiled_kernels_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(ref, "cg", boom)
    monkeypatch.setattr(ref, "step", boom)
    A, b = spd(3, 10), rhs(3, 10)
    slf.cg(A, b)
    slf.cg(op_of(A), b)
    slf.cg(op_of(A), b, M=torch.ones(10, dtype=A.dtype))


# ---------------------------------------------------------------- gradients and registration


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_gradcheck_dense(backend, device):
    n = 5
    P = (spd(2, n) + 0.1 * rhs(2, n, n)).to(device).requires_grad_(True)
    b = rhs(2, n, 2).to(device).requires_grad_(True)

    def f(P, b):
        A = 0.5 * (P + P.mT)  # the solve is defined for symmetric A
        return slf.cg(A, b, rtol=1e-14, maxiter=200, backend=backend).x

    assert torch.autograd.gradcheck(f, (P, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", DENSE, ids=DENSE_IDS)
def test_gradients_match_linalg_solve(backend, device):
    A0, b0 = spd(3, 7), rhs(3, 7)
    w = rhs(3, 7, seed=8)
    A1 = A0.clone().to(device).requires_grad_(True)
    b1 = b0.clone().to(device).requires_grad_(True)
    (slf.cg(A1, b1, rtol=1e-14, backend=backend).x * w.to(device)).sum().backward()
    A2, b2 = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    (torch.linalg.solve(A2, b2) * w).sum().backward()
    assert_tight(A1.grad.cpu(), A2.grad, rtol=1e-10)
    assert_tight(b1.grad.cpu(), b2.grad, rtol=1e-10)
    # Shared A over a batch: its gradient sums over the systems.
    As = A0[0].clone().requires_grad_(True)
    bs, ws = b0.unsqueeze(-1), w.unsqueeze(-1)  # (3, n, 1): a batch of systems sharing A
    (slf.cg(As, bs, rtol=1e-14, backend=backend if device.type == "cpu" else "reference").x * ws).sum().backward()
    As2 = A0[0].clone().requires_grad_(True)
    (torch.linalg.solve(As2, bs) * ws).sum().backward()
    assert_tight(As.grad, As2.grad, rtol=1e-10)


@pytest.mark.parametrize("backend,device", OPERATOR, ids=OPERATOR_IDS)
def test_matrix_free_gradient_in_b(backend, device):
    A = spd(2, 9)
    b = rhs(2, 9).to(device).requires_grad_(True)
    w = rhs(2, 9, seed=3).to(device)
    (slf.cg(op_of(A.to(device)), b, rtol=1e-14, backend=backend).x * w).sum().backward()
    assert_tight(b.grad.cpu(), torch.linalg.solve(A, w.cpu()), rtol=1e-10)


def _dense_args(device="cpu", x0=False, precond=None, shared=False, k=2):
    A = spd(1 if shared else 3, 6).to(device)
    b = rhs(3, 6, k).to(device)
    M = None
    if precond == "diag":
        M = (1 / torch.diagonal(A, dim1=-2, dim2=-1)).contiguous()
    elif precond == "dense":
        M = torch.linalg.inv(A)
    return (A, b, rhs(3, 6, k, seed=7).to(device) if x0 else None, M, 0.1, 1e-10, 0.0, 50)


@pytest.mark.skipif(not _ext.has_kernel("cg_dense", "CPU"), reason="extension not built")
@pytest.mark.parametrize("x0", [False, True])
@pytest.mark.parametrize("precond", [None, "diag", "dense"])
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_cg_dense(x0, precond, shared):
    args = _dense_args(x0=x0, precond=precond, shared=shared)
    torch.library.opcheck(torch.ops.structloss_fast.cg_dense.default, args)
    A, b = args[0].clone().requires_grad_(True), args[1].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.structloss_fast.cg_dense.default, (A, b) + args[2:])


@pytest.mark.skipif(not _ext.has_kernel("cg_update", "CPU"), reason="extension not built")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("diag", [False, True])
def test_opcheck_cg_update(k, diag):
    b = rhs(2, 7, k)
    A = spd(2, 7)
    state = ref.init_state(lambda p: A @ p, b, None, None, 1e-8, 0.0)
    x, r, p, rz, rn, tol, it, st = [t.clone() for t in state]
    d = torch.ones(2, 7, dtype=b.dtype) if diag else None
    torch.library.opcheck(torch.ops.structloss_fast.cg_update.default, (x, r, p, A @ p, d, rz, rn, tol, it, st))


def test_torch_compile_fullgraph():
    def step(A, b):
        return slf.cg(A, b, rtol=1e-10, backend="cpu").x * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    A, b = spd(4, 8), rhs(4, 8)
    assert_tight(compiled(A, b), step(A, b), rtol=1e-14)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clearly():
    A, b = spd(2, 4), rhs(2, 4)
    with pytest.raises(ValueError, match="A must be a batch of square"):
        slf.cg(torch.zeros(2, 4, 3, dtype=A.dtype), b)
    with pytest.raises(ValueError, match="b must be"):
        slf.cg(A, rhs(2, 5))
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        slf.cg(A, b, rtol=-1e-3)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        slf.cg(A, b, atol=-1.0)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        slf.cg(A, b, ridge=-0.1)
    with pytest.raises(ValueError, match="maxiter"):
        slf.cg(A, b, maxiter=-1)
    with pytest.raises(ValueError, match="check_every"):
        slf.cg(A, b, check_every=0)
    with pytest.raises(ValueError, match="rtol must be finite"):
        slf.cg(A, b, rtol=float("nan"))
    with pytest.raises(TypeError, match="A and b must have one dtype"):
        slf.cg(A.float(), b)
    with pytest.raises(TypeError, match="b must be float32 or float64"):
        slf.cg(A.half(), b.half())
    with pytest.raises(TypeError, match="A must be a tensor"):
        slf.cg("A", b)
    with pytest.raises(ValueError, match="x0 must broadcast"):
        slf.cg(A, b, x0=rhs(3, 4))
    with pytest.raises(ValueError, match="M must be"):
        slf.cg(A, b, M=torch.ones(5, dtype=A.dtype))
    with pytest.raises(ValueError, match="M must be None, 'jacobi'"):
        slf.cg(A, b, M="ilu")
    with pytest.raises(ValueError, match="jacobi"):
        slf.cg(op_of(A), b, M="jacobi")
    with pytest.raises(ValueError, match=r"A\(p\) must return a tensor like p"):
        slf.cg(lambda p: p[..., :2], b)
    with pytest.raises(ValueError, match="backend must be one of"):
        slf.cg(A, b, backend="gpu")
    with pytest.raises(slf.BackendUnavailable, match="no triton kernel for cg_dense"):
        slf.cg(A, b, backend="triton")
    with pytest.raises(slf.BackendUnavailable):
        slf.cg(A, b, backend="cuda")
    with pytest.raises(ValueError, match="do not broadcast"):
        slf.cg(spd(3, 4), rhs(2, 4, 1))
    with pytest.raises(ValueError, match="multi_rhs=True needs"):
        slf.cg(op_of(A), rhs(4), multi_rhs=True)

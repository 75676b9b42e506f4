"""A property-based sweep (hypothesis) over every public loss and the public functions with a
reference: random shapes (empty and single-row batches included), dtypes, layouts (transposed,
expanded, strided views), reductions and non-finite values, on every backend this machine runs.
Each result is checked against the reference on contiguous float64 copies of the same values
(same shape, the same non-finite entries, the finite ones within the dtype's tolerance), or
both raise the same clear exception. Non-finite inputs always give a non-finite result.

Bounded for CI: SWEEP_EXAMPLES examples per function (default 25: about 45 s on the 2-core
machine; derandomized so that a run is reproducible); raise it locally for a longer search,
e.g. SWEEP_EXAMPLES=200."""
from __future__ import annotations

import os

import pytest
import torch

import structloss_fast as slf
from structloss_fast.pairwise import _ops as pairwise_ops
from structloss_fast.seal import reference as seal_ref
from tests.catalog import CASES, Case
from tests.helpers import can_run

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("SWEEP_EXAMPLES", "25"))
SWEEP = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
CLEAR = (ValueError, TypeError, NotImplementedError, slf.BackendUnavailable)
# The 16-bit dtypes' tolerance relative to the result's scale (a few ulps of the output dtype,
# which is where the kernels round their float32 result).
RTOL = {torch.float64: 1e-7, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# Losses that run a network on the inputs (its layers compute in the inputs' dtype): 32/64-bit only.
NETWORK = {"nce_ranking_loss", "regression_loss", "margin_loss", "seal_task_loss", "pgd_adversarial_loss",
           "trades_loss"}


def layout(t: torch.Tensor, kind: str, B: int) -> torch.Tensor:
    """The same values in another layout (expanded: every row is row 0)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "strided" and t.dim() >= 1:
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if kind == "expanded" and t.dim() >= 1 and B >= 1 and t.shape[0] == B:
        return t[:1].expand_as(t)
    return t


def attempt(fn):
    try:
        return fn(), None
    except CLEAR as exc:
        return None, exc


def assert_matches(out, expected, dtype, what):
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    o, e = out.detach().double().cpu(), expected.detach().double().cpu()
    bad_o, bad_e = ~torch.isfinite(o), ~torch.isfinite(e)
    assert torch.equal(bad_o, bad_e), f"{what}: non-finite at {bad_o.nonzero().tolist()}, expected {bad_e.nonzero().tolist()}"
    if (~bad_e).any():
        scale = e[~bad_e].abs().max().item() + 1e-3
        err = (o[~bad_e] - e[~bad_e]).abs().max().item()
        assert err <= RTOL[dtype] * scale + 1e-9, f"{what}: error {err:.3e} at scale {scale:.3e}"


@st.composite
def problems(draw, case: Case):
    dtypes = [torch.float64, torch.float32] + ([] if case.name in NETWORK else [torch.bfloat16, torch.float16])
    return dict(
        B=draw(st.sampled_from([0, 1, 2, 5, 7])),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "expanded", "strided"])),
        reduction=draw(st.sampled_from(case.reductions)),
        poison=draw(st.sampled_from([None, None, "nan", "inf"])),
        backend=draw(st.sampled_from([b for b, _ in case.available()])),
        seed=draw(st.integers(0, 2**16)),
    )


def check_loss(case: Case, p: dict):
    gen = torch.Generator().manual_seed(p["seed"])
    inputs, const = case.build(p["B"], torch.float64, gen)
    if p["poison"] is not None and p["B"] > 0:  # (an empty batch has no value to poison: its loss is 0)
        target = inputs[0]
        target.view(-1)[torch.randint(0, target.numel(), (1,), generator=gen)] = float(p["poison"])
    else:
        p["poison"] = None
    dtype = p["dtype"]
    low = [t.to(dtype) for t in inputs]
    # Floating constants (probabilities, samples) hold values of the tested dtype, so that every
    # call sees the same numbers whatever dtype it casts them to.
    const = {k: v.to(dtype).to(v.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in const.items()}
    tested = [layout(t, p["layout"], p["B"]) for t in low]
    # The expectation: the reference on contiguous float64 copies of the same values; where the
    # call under test is the reference itself or plain torch ops (whose 16-bit accuracy is
    # torch's own), the same call on contiguous copies in the same dtype.
    same = [layout(t, p["layout"], p["B"]).contiguous() for t in low]
    if p["backend"] == "reference" or case.op is None:
        truth_backend, truth_inputs = p["backend"], same
    else:
        truth_backend, truth_inputs = "reference", [t.double() for t in same]
    what = f"{case.name} {p}"
    expected, exp_exc = attempt(lambda: case.call(truth_backend, p["reduction"], *truth_inputs, **const))
    out, exc = attempt(lambda: case.call(p["backend"], p["reduction"], *tested, **const))
    if exp_exc is not None or exc is not None:
        assert type(exc) is type(exp_exc), f"{what}: {exc!r} where the reference gives {exp_exc!r}"
        assert str(exc), f"{what}: an exception without a message"
        return
    assert out.dtype == dtype, f"{what}: result dtype {out.dtype}"
    assert_matches(out, expected, dtype, what)
    if any(not torch.isfinite(t).all() for t in tested):  # (an expanded layout may have dropped the poisoned row)
        assert not torch.isfinite(out).all(), f"{what}: a finite result for non-finite input"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sweep_losses(case):
    @SWEEP
    @given(problems(case))
    def run(p):
        check_loss(case, p)

    run()


# ---------------------------------------------------------------- the other public functions


@SWEEP
@given(n=st.sampled_from([1, 3, 6]), batch=st.sampled_from([(), (2,), (0,)]), k=st.sampled_from([None, 2]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]), lay=st.sampled_from(["c", "t"]),
       poison=st.booleans(), seed=st.integers(0, 2**16))
def test_sweep_cg(n, batch, k, dtype, lay, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    A = M @ M.mT + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(*batch, n, *(() if k is None else (k,)), generator=gen, dtype=torch.float64)
    if poison and b.numel():
        b.view(-1)[0] = float("nan")
    A, b = A.to(dtype), b.to(dtype)
    if lay == "t":
        A = A.mT.contiguous().mT
    results = {}
    for backend in ("reference", "cpu"):
        res, exc = attempt(lambda: slf.cg(A, b, rtol=1e-10, maxiter=200, backend=backend))
        results[backend] = (res, exc)
    (ref, ref_exc), (got, exc) = results["reference"], results["cpu"]
    if ref_exc is not None or exc is not None:
        assert type(exc) is type(ref_exc) and dtype == torch.float16 and "float32 or float64" in str(exc)
        return
    assert_matches(got.x, ref.x, torch.float32 if dtype == torch.float32 else torch.float64, "cg")
    if not poison and b.numel():
        torch.testing.assert_close(got.x.double(), torch.linalg.solve(A.double(), b.double().unsqueeze(-1) if k is None
                                                                     else b.double()).reshape(b.shape),
                                   rtol=1e-3 if dtype == torch.float32 else 1e-8, atol=1e-5)
    assert torch.equal(got.converged, ref.converged)


@SWEEP
@given(shape=st.sampled_from([(0,), (3,), (2, 5), (4, 1, 3)]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       clamp=st.sampled_from([None, 0.5]), poison=st.booleans(), seed=st.integers(0, 2**16))
def test_sweep_sgld_step(shape, dtype, clamp, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if poison and x.numel():
        g.view(-1)[0] = float("nan")
    out = {}
    for backend in ("reference", "cpu"):
        y = x.clone()
        out[backend] = slf.sgld_step_(y, g, step_size=0.1, noise_std=0.01, x_clamp=clamp, noise=noise, backend=backend)
    assert_matches(out["cpu"], out["reference"], dtype if dtype != torch.bfloat16 else torch.bfloat16, "sgld_step_")


@SWEEP
@given(B=st.sampled_from([0, 1, 3]), L=st.sampled_from([1, 4, 9]), K=st.sampled_from([1, 3]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]), seed=st.integers(0, 2**62))
def test_sweep_seal_bernoulli(B, L, K, dtype, seed):
    probs = torch.rand(B, L, generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float64).to(dtype)
    drawn = slf.seal_bernoulli(probs, K, seed=seed)
    expected = seal_ref.philox_bernoulli(probs, K, seal_ref.seed_value(torch.tensor([seed])))
    assert drawn.shape == (B, K, L) and drawn.dtype == dtype
    torch.testing.assert_close(drawn, expected.to(dtype))


@SWEEP
@given(N=st.sampled_from([0, 1, 6]), C=st.sampled_from([1, 3]), bins=st.sampled_from([1, 5, 20]),
       poison=st.sampled_from([None, "nan", "inf"]), seed=st.integers(0, 2**16))
def test_sweep_expected_calibration_error(N, C, bins, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(N, C, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, C, (N,), generator=gen)
    if poison and N:
        probs[N - 1, 0] = float(poison)
        with pytest.raises(ValueError, match="probs must be finite"):
            slf.expected_calibration_error(probs, labels, n_bins=bins)
        return
    ece = slf.expected_calibration_error(probs, labels, n_bins=bins)
    conf, pred = probs.max(1)
    total = 0.0
    for m in range(bins):  # the loop definition
        inside = (conf > m / bins) & (conf <= (m + 1) / bins) if m else conf <= 1 / bins
        if inside.any():
            total += inside.sum().item() / N * abs((pred[inside] == labels[inside]).double().mean().item()
                                                   - conf[inside].mean().item())
    if N == 0:
        assert torch.isnan(ece)
    else:
        assert abs(ece.item() - total) < 1e-12


@SWEEP
@given(B=st.sampled_from([2, 5, 8]), name=st.sampled_from(["circle", "supcon", "contrastive", "triplet_hard"]),
       backend=st.sampled_from(["cpu", "triton"]), seed=st.integers(0, 2**16))
def test_sweep_loss_terms(B, name, backend, seed):
    """The unreduced terms reduce (the family's reduce_terms, the batch gate included) to the
    reference's per-anchor losses."""
    if not can_run(backend, "pairwise_loss"):
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=gen)
    fn, params = {"circle": (slf.circle_loss, (0.4, 80.0)), "supcon": (slf.supcon_loss, (0.1,)),
                  "contrastive": (slf.contrastive_loss, (0.0, 1.0)),
                  "triplet_hard": (lambda *a, **k: slf.triplet_margin_loss(*a, mining="batch_hard", **k), (0.05,))}[name]
    terms, stats = slf.loss_terms(name, params, x, y, backend=backend)
    loss_id = pairwise_ops.LOSSES[name]
    rows = pairwise_ops.reduce_terms(terms, pairwise_ops.totals(stats, loss_id), loss_id, "none")
    torch.testing.assert_close(rows, fn(x, y, reduction="none", backend="reference"), rtol=1e-9, atol=1e-12)


@SWEEP
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.sampled_from([0.0, 0.1, [0.05, 0.2]]),
       B=st.sampled_from([0, 1, 4]), poison=st.booleans(), seed=st.integers(0, 2**16))
def test_sweep_pgd_attack(norm, eps, B, poison, seed):
    """No reference to compare with: the adversarial inputs stay in the threat model (the ball
    around x and the clamp range), finite for finite x, and keep x's shape."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 4).double()
    x = torch.rand(B, 3, generator=gen, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (B,), generator=gen)
    if poison and B:
        x[0, 0] = float("nan")
    adv = slf.pgd_attack(model, x, y, norm=norm, eps=eps, n_iter=3, generator=gen)
    radii = eps if isinstance(eps, list) else [eps]
    advs = adv if isinstance(eps, list) else adv.unsqueeze(0)
    assert advs.shape == (len(radii), B, 3)
    for a, r in zip(advs, radii):
        d = a - x
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        ok = torch.isfinite(x).all(1)
        assert torch.isfinite(a[ok]).all() and (size[ok] <= r + 1e-9).all()
        assert (a[ok].abs() <= 1.0).all()

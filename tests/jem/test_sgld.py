"""The fused SGLD step: every backend against the reference on the same noise (bit for bit in
float32/float64), the in-kernel Philox noise against an independent NumPy Philox4x32-10 +
Box-Muller, reproducibility (manual_seed, generator=, thread count), the noise's distribution,
custom-op registration, edge cases and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import structloss_fast as slf
from structloss_fast import _ext
from structloss_fast.jem import reference as ref
from structloss_fast.jem.sgld import SGLD_VARIANTS
from tests.helpers import assert_close_to_truth, fast_backends, max_abs

BACKENDS = fast_backends("sgld_step_", backends=("cpu", "cuda"))
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]
OP = torch.ops.structloss_fast.sgld_step_

# (name, kwargs of sgld_step_ besides step_size): every documented variant, plus the
# clamps on their own and odd bounds that are not exact in float32.
VARIANTS = [
    ("jem", dict(noise_std=0.01)),
    ("jem_big_noise", dict(noise_std=0.7)),
    ("jem++", dict(noise_std=0.01, grad_clamp=1.0, x_clamp=(-1.0, 1.0), noise_after_clamp=True)),
    ("jem++_no_noise", dict(noise_std=0.0, grad_clamp=1.0, x_clamp=(-1.0, 1.0), noise_after_clamp=True)),
    ("sada-jem", dict(noise_std=0.01, grad_clamp=1.0, x_clamp=(-1.0, 1.0))),
    ("langevin", dict(form="langevin")),
    ("langevin_clamped", dict(form="langevin", grad_clamp=(-0.3, 0.7), x_clamp=(-0.9, 1.1))),
    ("grad_clamp_only", dict(noise_std=0.05, grad_clamp=(-0.1, 0.35))),
    ("x_clamp_only", dict(noise_std=0.05, x_clamp=(-0.5, 0.25))),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
SHAPES = [(1,), (7,), (511,), (513,), (3, 5, 7), (4, 3, 11, 13)]


def inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(device=device, dtype=dtype)
    grad = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0).to(device=device, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, grad, noise


def step_size_of(kw):
    return 0.003 if kw.get("form") == "langevin" else 0.37


# ---------------------------------------------------------------- parity on the same noise


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name,kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_explicit_noise_bit_exact(backend, device, name, kw, dtype, shape):
    """Given the noise, float32/float64 results equal the reference's to the bit."""
    x, grad, noise = inputs(shape, dtype, device)
    expected = ref.sgld_step(x, grad, noise, step_size=step_size_of(kw), **kw)
    out = x.clone()
    returned = slf.sgld_step_(out, grad, step_size=step_size_of(kw), noise=noise, backend=backend, **kw)
    assert returned is out
    assert torch.equal(out, expected), f"max diff {max_abs(out, expected):.3e}"


NOISE_FREE = [v for v in VARIANTS if v[1].get("noise_std", None) == 0.0]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name,kw", NOISE_FREE, ids=[v[0] for v in NOISE_FREE])
def test_matches_reference_without_noise_argument_when_noise_free(backend, device, name, kw):
    x, grad, _ = inputs((1000,), torch.float32, device)
    expected = ref.sgld_step(x, grad, None, step_size=0.37, **kw)
    out = slf.sgld_step_(x.clone(), grad, step_size=0.37, backend=backend, **kw)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name,kw", [v for v in VARIANTS if v[0] in ("jem", "sada-jem", "langevin", "jem_big_noise")],
                         ids=["jem", "jem_big_noise", "sada-jem", "langevin"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_torch_error(backend, device, name, kw, dtype):
    """float16/bfloat16: computed in float32 and rounded once; no worse than twice the error of
    the reference run in that dtype (against the float64 truth on the same inputs)."""
    x, grad, noise = inputs((4, 3, 17, 19), dtype, device)
    s = step_size_of(kw)
    truth = ref.sgld_step(x.double(), grad.double(), noise.double(), step_size=s, **kw)
    torch_low = ref.sgld_step(x, grad, noise, step_size=s, **kw)
    out = slf.sgld_step_(x.clone(), grad, step_size=s, noise=noise, backend=backend, **kw)
    assert out.dtype == dtype
    assert_close_to_truth(out, truth, torch_low, floor=0.0, what=f"{name} {dtype}")
    # and at most half an ulp of the result (a single rounding) away from the truth
    ulp = torch.finfo(dtype).eps * truth.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - truth).abs() <= 0.5 * ulp.to(truth.device) + 1e-12).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_authors_loop_bit_exact(backend, device):
    """20 steps of the authors' update `x.data += a * g + s * randn_like(x)` on a small CNN,
    replayed with the same noise through sgld_step_: identical chains."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 64, 10)).to(device)
    x0 = (torch.rand(16, 1, 8, 8) * 2 - 1).to(device)
    noises = [torch.randn(16, 1, 8, 8).to(device) for _ in range(20)]
    authors = x0.clone().requires_grad_(True)
    for eps in noises:
        f_prime = torch.autograd.grad(model(authors).logsumexp(1).sum(), [authors], retain_graph=True)[0]
        authors.data += 1.0 * f_prime + 0.01 * eps
    ours = x0.clone().requires_grad_(True)
    for eps in noises:
        g = torch.autograd.grad(model(ours).logsumexp(1).sum(), [ours])[0]
        slf.sgld_step_(ours, g, step_size=1.0, noise_std=0.01, noise=eps, backend=backend)
    assert torch.equal(ours.detach(), authors.detach())


# ---------------------------------------------------------------- the in-kernel noise


M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c, k):
    """NumPy Philox4x32-10 (Salmon et al. 2011) on uint64 arrays holding 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint64) for v in c)
    k0, k1 = np.uint64(k[0]), np.uint64(k[1])
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> np.uint64(32)) ^ c3 ^ k1) & M32, p0 & M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    return c0, c1, c2, c3


def test_numpy_philox_known_answers():
    """The NumPy Philox used below against Random123's published known-answer vectors."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        out = philox4x32_10([[v] for v in ctr], key)
        assert tuple(int(o[0]) for o in out) == expected


def expected_noise(n, seed, ctr, dtype):
    """The normals the kernels generate for elements 0..n-1 under key `seed`, counter base `ctr`
    (layout and uniforms as documented in csrc/common/sgld_math.h), in float64."""
    W = 128
    per = 2 if dtype == torch.float64 else 4
    n_tiles = -(-n // (W * per))
    blocks = np.arange(n_tiles * W, dtype=np.uint64)
    words = philox4x32_10(
        (np.full_like(blocks, ctr & 0xFFFFFFFF), np.full_like(blocks, ctr >> 32), blocks & M32, blocks >> np.uint64(32)),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    if per == 4:
        normals = []
        for wr, wa in ((words[0], words[1]), (words[2], words[3])):
            u = ((wr >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24
            v = (wa >> np.uint64(8)).astype(np.float64) * 2.0 ** -24
            r = np.sqrt(-2.0 * np.log(u))
            normals += [r * np.cos(2 * np.pi * v), r * np.sin(2 * np.pi * v)]
    else:
        wr = words[0] | (words[1] << np.uint64(32))
        wa = words[2] | (words[3] << np.uint64(32))
        u = ((wr >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0 ** -53
        v = (wa >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        r = np.sqrt(-2.0 * np.log(u))
        normals = [r * np.cos(2 * np.pi * v), r * np.sin(2 * np.pi * v)]
    stacked = np.stack(normals, axis=0).reshape(per, n_tiles, W).transpose(1, 0, 2).reshape(-1)
    return torch.from_numpy(stacked[:n].copy())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 512, 1000, 70001])
@pytest.mark.parametrize("seed,ctr", [(0, 0), (123456789, 7), (2**62 + 12345, 2**33 + 5)])
def test_kernel_noise_is_philox_box_muller(backend, device, dtype, n, seed, ctr):
    """With an explicit Philox key the kernel's noise equals Box-Muller on the NumPy Philox
    words: exactly the same uniforms (an error would be O(1), not O(ulp))."""
    x = torch.zeros(n, dtype=dtype, device=device)
    OP(x, torch.zeros_like(x), None, 0.0, 1.0, [], [], False, None, [seed, ctr])
    exp = expected_noise(n, seed, ctr, dtype)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    err = (x.cpu().double() - exp).abs().max().item()
    assert err <= tol, f"max error {err:.3e}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_noise_distribution(backend, device):
    """N(0, 1): moments, Kolmogorov-Smirnov distance, tails, and no correlation between
    neighbouring elements or between the normals of one Philox block (k*W apart)."""
    n = 1 << 20
    x = torch.zeros(n, device=device)
    slf.sgld_step_(x, torch.zeros_like(x), step_size=1.0, noise_std=1.0, backend=backend)
    z = x.double().cpu()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z ** 3).mean().item()) < 5 * math.sqrt(15) * se
    assert abs((z ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se
    zs, _ = torch.sort(z)
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (cdf - emp).abs().max().item()
    assert ks < 1.63 / math.sqrt(n) * 1.5  # well beyond the 1% critical value only when broken
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    for lag in (1, 128, 256, 384, 512):
        corr = (z[:-lag] * z[lag:]).mean().item()
        assert abs(corr) < 5 * se, f"lag {lag}: correlation {corr:.2e}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_reproducible_under_manual_seed(backend, device, dtype):
    x, grad, _ = inputs((3, 700), dtype, device)

    def run():
        out = x.clone()
        slf.sgld_step_(out, grad, step_size=0.5, noise_std=0.1, backend=backend)
        slf.sgld_step_(out, grad, step_size=0.5, noise_std=0.1, backend=backend)
        return out

    torch.manual_seed(42)
    a = run()
    torch.manual_seed(42)
    b = run()
    c = run()  # the generator moved on: new noise
    assert torch.equal(a, b)
    assert not torch.equal(b, c)
    # two consecutive steps use different noise
    torch.manual_seed(42)
    one = x.clone()
    slf.sgld_step_(one, torch.zeros_like(grad), step_size=0.0, noise_std=1.0, backend=backend)
    two = x.clone()
    slf.sgld_step_(two, torch.zeros_like(grad), step_size=0.0, noise_std=1.0, backend=backend)
    assert not torch.equal(one, two)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_explicit_generator(backend, device):
    x, grad, _ = inputs((5000,), torch.float32, device)
    outs = []
    for seed in (7, 7, 8):
        gen = torch.Generator(device=device).manual_seed(seed)
        out = x.clone()
        torch.manual_seed(seed + 1000)  # the default generator must not matter
        slf.sgld_step_(out, grad, step_size=0.1, noise_std=0.3, generator=gen, backend=backend)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # the default generator is untouched when an explicit one is given
    torch.manual_seed(5)
    state = torch.get_rng_state()
    slf.sgld_step_(x.clone(), grad, step_size=0.1, noise_std=0.3, generator=torch.Generator(device=device).manual_seed(1),
                   backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


def test_cpu_result_independent_of_thread_count():
    x, grad, _ = inputs((64, 3, 32, 32), torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.manual_seed(11)
            out = x.clone()
            slf.sgld_step_(out, grad, step_size=1.0, noise_std=0.01, backend="cpu")
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_noise_follows_logical_index_not_memory_layout(backend, device):
    """Non-contiguous x and grad: the same result as on contiguous copies (same seed)."""
    base, grad_base, _ = inputs((8, 3, 9, 9), torch.float32, device)
    x_cl = base.contiguous(memory_format=torch.channels_last)
    g_t = grad_base.transpose(0, 3).contiguous().transpose(0, 3)
    assert not x_cl.is_contiguous() and not g_t.is_contiguous()
    torch.manual_seed(1)
    slf.sgld_step_(x_cl, g_t, step_size=0.2, noise_std=0.5, backend=backend)
    torch.manual_seed(1)
    expected = slf.sgld_step_(base.clone(), grad_base, step_size=0.2, noise_std=0.5, backend=backend)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_cl, expected)
    # a strided view is updated in place, its neighbours untouched
    big = torch.zeros(10, 20, device=device)
    view = big[:, ::2]
    slf.sgld_step_(view, torch.ones_like(view), step_size=1.0, noise_std=0.0, backend=backend)
    assert torch.equal(big[:, ::2], torch.ones(10, 10, device=device))
    assert torch.equal(big[:, 1::2], torch.zeros(10, 10, device=device))


def test_auto_uses_the_compiled_kernel_on_cpu():
    """backend='auto' on CPU runs the C++ kernel (its noise is Philox, the reference's is
    torch.randn: the same seed gives the kernel's result, not the reference's)."""
    x, grad, _ = inputs((4096,), torch.float32)
    results = {}
    for backend in ("auto", "cpu", "reference"):
        torch.manual_seed(9)
        results[backend] = slf.sgld_step_(x.clone(), grad, step_size=1.0, noise_std=0.5, backend=backend)
    assert torch.equal(results["auto"], results["cpu"])
    assert not torch.equal(results["auto"], results["reference"])
    assert _ext.has_kernel("sgld_step_", "CPU")


def test_reference_backend_draws_torch_randn():
    x, grad, _ = inputs((300,), torch.float64)
    torch.manual_seed(4)
    out = slf.sgld_step_(x.clone(), grad, step_size=0.5, noise_std=0.2, backend="reference")
    torch.manual_seed(4)
    eps = torch.randn(300, dtype=torch.float64)
    assert torch.equal(out, ref.sgld_step(x, grad, eps, step_size=0.5, noise_std=0.2))


def test_noise_std_zero_draws_nothing():
    x, grad, _ = inputs((1000,), torch.float32)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    slf.sgld_step_(x.clone(), grad, step_size=1.0, noise_std=0.0)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- SGLD on a known energy


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("form", ["jem", "langevin"])
def test_gaussian_energy_stationary_moments(backend, device, form):
    """A one-logit 'classifier' f(x) = -|x - mu|^2 / (2 s^2) has p(x) = N(mu, s^2 I). Chains
    driven by autograd gradients and sgld_step_ reach the stationary law of the discretized
    chain: mean mu, variance v = b^2 / (1 - (1 - a / s^2)^2) (a, b the gradient and noise
    coefficients), which is s^2 / (1 - alpha / (4 s^2)) for the Langevin form (a = alpha / 2)."""
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)
    s = 0.8
    chains, steps = 4096, 300
    x = torch.zeros(chains, 4, device=device, requires_grad=True)
    kw = dict(step_size=0.05, form="langevin") if form == "langevin" else dict(step_size=0.02, noise_std=0.1)
    a, b = ref.step_coefficients(kw["step_size"], kw.get("noise_std"), form)
    for _ in range(steps):
        logits = (-((x - mu) ** 2).sum(1, keepdim=True) / (2 * s * s))
        g, = torch.autograd.grad(logits.logsumexp(1).sum(), [x])
        slf.sgld_step_(x, g, backend=backend, **kw)
    v = b * b / (1 - (1 - a / (s * s)) ** 2)
    if form == "langevin":
        alpha = kw["step_size"]
        assert abs(v - s * s / (1 - alpha / (4 * s * s))) < 1e-12
    z = x.detach().double().cpu()
    n = z.shape[0]
    mean_err = (z.mean(0) - mu.double().cpu()).abs().max().item()
    assert mean_err < 5 * math.sqrt(v / n)
    var = z.var(0)
    assert ((var / v - 1).abs() < 5 * math.sqrt(2 / n)).all(), var / v


# ---------------------------------------------------------------- custom op registration


@pytest.mark.parametrize("device", sorted({d.type for _, d in BACKENDS}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    x, grad, noise = inputs((4, 3, 5, 5), dtype, device)
    cases = [
        (x.clone(), grad, noise, 0.5, 0.1, [], [], False, None, []),
        (x.clone(), grad, noise, 1.0, 0.01, [-1.0, 1.0], [-1.0, 1.0], True, None, []),
        (x.clone(), grad, None, 1.0, 0.0, [-0.5, 0.5], [], False, None, []),
        (x.clone(), grad, None, 1.0, 0.3, [], [-1.0, 1.0], False, None, [5, 6]),
    ]
    for args in cases:
        torch.library.opcheck(OP, args)


def test_opcheck_generated_noise_with_generator():
    x, grad, _ = inputs((2, 50), torch.float32)
    gen = torch.Generator().manual_seed(0)
    torch.library.opcheck(OP, (x.clone(), grad, None, 1.0, 0.01, [], [], False, gen, []),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_matches_eager():
    x, grad, noise = inputs((6, 40), torch.float32)

    def chain(x, grad, noise):
        for _ in range(3):
            slf.sgld_step_(x, grad, step_size=0.3, noise_std=0.1, grad_clamp=1.0, x_clamp=(-1.0, 1.0), noise=noise)
        return x

    compiled = torch.compile(chain, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x.clone(), grad, noise), chain(x.clone(), grad, noise))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", torch.device("cpu"))],
                         ids=BACKEND_IDS + ["reference-cpu"])
def test_empty_and_scalar(backend, device):
    x = torch.empty(0, 3, device=device)
    slf.sgld_step_(x, torch.empty(0, 3, device=device), step_size=1.0, noise_std=0.1, backend=backend)
    assert x.shape == (0, 3)
    s = torch.tensor(0.5, device=device)
    slf.sgld_step_(s, torch.tensor(1.0, device=device), step_size=0.25, noise_std=0.0, backend=backend)
    assert s.item() == 0.75


@pytest.mark.parametrize("backend,device", BACKENDS + [("reference", torch.device("cpu"))],
                         ids=BACKEND_IDS + ["reference-cpu"])
def test_non_finite_propagates(backend, device):
    x = torch.tensor([0.0, 0.5, float("nan"), 0.1, 0.2, 0.3], device=device)
    g = torch.tensor([float("nan"), float("inf"), 0.0, float("-inf"), 0.0, 0.0], device=device)
    out = slf.sgld_step_(x.clone(), g, step_size=1.0, noise_std=0.01, backend=backend)
    assert torch.isnan(out[0]) and torch.isposinf(out[1]) and torch.isnan(out[2]) and torch.isneginf(out[3])
    assert torch.isfinite(out[4:]).all()
    # clamps keep NaN as torch.clamp does (a NaN never becomes a finite number)
    out = slf.sgld_step_(x.clone(), g, step_size=1.0, noise_std=0.01, grad_clamp=1.0, x_clamp=1.0, backend=backend)
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    assert out[1].item() == 1.0  # inf gradient clamped to 1, then x clamped


def test_leaf_requiring_grad_is_updated_without_autograd():
    x = torch.zeros(10, requires_grad=True)
    slf.sgld_step_(x, torch.ones(10), step_size=0.5, noise_std=0.0)
    assert x.requires_grad and x.grad_fn is None
    assert torch.equal(x.detach(), torch.full((10,), 0.5))


def test_grad_may_alias_x():
    x = torch.full((100,), 2.0)
    slf.sgld_step_(x, x, step_size=0.5, noise_std=0.0)
    assert torch.equal(x, torch.full((100,), 3.0))


def test_variant_presets_match_their_definitions():
    x, grad, noise = inputs((300,), torch.float32)
    for name, preset in SGLD_VARIANTS.items():
        kw = {k: v for k, v in preset.items()}
        out = slf.sgld_step_(x.clone(), grad, noise=noise, **kw)
        assert torch.equal(out, ref.sgld_step(x, grad, noise, **kw)), name
    # JEM++: noise after the clamp can leave [-1, 1]; SADA-JEM: never
    big = torch.full((1000,), 0.99)
    plus = slf.sgld_step_(big.clone(), torch.ones(1000), **dict(SGLD_VARIANTS["jem++"], noise_std=0.1))
    sada = slf.sgld_step_(big.clone(), torch.ones(1000), **SGLD_VARIANTS["sada-jem"])
    assert plus.abs().max() > 1.0 and sada.abs().max() <= 1.0


# ---------------------------------------------------------------- bad input


def call(**over):
    args = dict(x=torch.zeros(4, 5), grad=torch.zeros(4, 5), step_size=1.0, noise_std=0.01)
    args.update(over)
    x = args.pop("x")
    grad = args.pop("grad")
    return slf.sgld_step_(x, grad, **args)


@pytest.mark.parametrize("over,exc,words", [
    (dict(step_size=-1.0), ValueError, "step_size"),
    (dict(step_size=float("nan")), ValueError, "step_size"),
    (dict(noise_std=-0.1), ValueError, "noise_std"),
    (dict(noise_std=None), ValueError, "noise_std"),
    (dict(form="langevin"), ValueError, "noise_std"),
    (dict(form="mala"), ValueError, "form"),
    (dict(grad=torch.zeros(4, 6)), ValueError, "grad"),
    (dict(grad=torch.zeros(20)), ValueError, "grad"),
    (dict(grad=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "grad"),
    (dict(x=torch.zeros(4, 5, dtype=torch.long), grad=torch.zeros(4, 5, dtype=torch.long)), TypeError, "x"),
    (dict(x=[0.0]), TypeError, "x"),
    (dict(noise=torch.zeros(5, 4)), ValueError, "noise"),
    (dict(noise=torch.zeros(4, 5, dtype=torch.float16)), TypeError, "noise"),
    (dict(grad_clamp=(1.0, -1.0)), ValueError, "grad_clamp"),
    (dict(x_clamp=(0.5, 0.4)), ValueError, "x_clamp"),
    (dict(x_clamp=(0.0, 1.0, 2.0)), ValueError, "x_clamp"),
    (dict(grad_clamp=-1.0), ValueError, "grad_clamp"),
    (dict(x_clamp=(float("nan"), 1.0)), ValueError, "x_clamp"),
    (dict(noise_after_clamp=1), TypeError, "noise_after_clamp"),
    (dict(generator=0), TypeError, "generator"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input(over, exc, words):
    with pytest.raises(exc, match=words):
        call(**over)


def test_unavailable_backends_raise():
    with pytest.raises(slf.BackendUnavailable, match="no triton kernel for sgld_step_"):
        call(backend="triton")
    with pytest.raises(slf.BackendUnavailable, match="cuda"):
        call(backend="cuda")


def test_internal_overlap_is_refused():
    x = torch.zeros(1, 5).expand(3, 5)
    with pytest.raises(RuntimeError, match="memory location"):
        slf.sgld_step_(x, torch.zeros(3, 5), step_size=1.0, noise_std=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_generator_device_mismatch():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="generator"):
        slf.sgld_step_(x, x.clone(), step_size=1.0, noise_std=0.1, generator=torch.Generator(device="cuda"))


# ---------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not any(b == "cuda" for b, _ in BACKENDS), reason="needs a GPU and the CUDA kernels")
def test_cuda_graph_capture_replays_fresh_noise():
    """Captured in a CUDA graph, each replay draws new noise (the Philox offset advances on the
    device), and two replays after manual_seed reproduce the eager sequence's statistics."""
    x = torch.zeros(1 << 16, device="cuda")
    g = torch.zeros_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        slf.sgld_step_(x, g, step_size=0.0, noise_std=1.0)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slf.sgld_step_(x, g, step_size=0.0, noise_std=1.0)
    x.zero_()
    graph.replay()
    first = x.clone()
    x.zero_()
    graph.replay()
    second = x.clone()
    torch.cuda.synchronize()
    assert not torch.equal(first, second)
    for z in (first, second):
        assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_cpu_step_allocates_no_temporary():
    """One pass in place: no tensor allocation at all during the step (the composite update
    allocates several tensors of x's size)."""
    from torch.profiler import ProfilerActivity, profile

    x, grad, _ = inputs((64, 3, 32, 32), torch.float32)

    def allocated(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sum(max(e.cpu_memory_usage, 0) for e in prof.events())

    fused = allocated(lambda: slf.sgld_step_(x, grad, step_size=1.0, noise_std=0.01))
    composite = allocated(lambda: x.data.add_(1.0 * grad + 0.01 * torch.randn_like(x)))
    assert composite >= 3 * x.nbytes  # the check can see temporaries
    assert fused < x.nbytes // 16, f"the fused step allocated {fused} bytes"


def test_portable_philox_path_matches_avx2_path(tmp_path):
    """The portable Philox loop (CPUs without AVX2) gives the same noise bits as the AVX2 path."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, structloss_fast\n"
        "out = {}\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    x = torch.zeros(70001, dtype=dt)\n"
        "    torch.ops.structloss_fast.sgld_step_(x, torch.zeros_like(x), None, 0.0, 1.0, [], [], False, None,"
        " [987654321, 3])\n"
        "    out[str(dt)] = x\n"
        f"torch.save(out, {str(tmp_path / 'noise.pt')!r})\n"
    )
    for flag in ("0", "1"):
        env = dict(os.environ, STRUCTLOSS_FAST_SGLD_PORTABLE=flag)
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        os.replace(tmp_path / "noise.pt", tmp_path / f"noise{flag}.pt")
    avx, portable = torch.load(tmp_path / "noise0.pt"), torch.load(tmp_path / "noise1.pt")
    for key in avx:
        assert torch.equal(avx[key], portable[key]), key
        assert (avx[key] - expected_noise(70001, 987654321, 3, getattr(torch, key.split(".")[1]))).abs().max() < 2e-6

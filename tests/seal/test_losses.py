"""SEAL family: the energy against a hand-written formula, the fused sample-and-score NCE kernel
(every backend) against the reference on fixed samples and on its own seeded samples, its
sampling statistics, gradients (gradcheck), custom-op registration (opcheck, torch.compile),
the regression / margin / task losses, SPEN's gradient-based inference, edge cases and bad input."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast import _ext, _registry
from structloss_fast.seal import reference as ref
from tests.helpers import assert_close_to_truth, assert_tight, can_run, fast_backends, max_abs, triton_device

BACKENDS = fast_backends("seal_nce_loss", backends=("cpu", "triton"))
BACKEND_IDS = [f"{b}-{d.type}" for b, d in BACKENDS]
ALL = [("reference", torch.device("cpu"))] + BACKENDS
ALL_IDS = ["reference-cpu"] + BACKEND_IDS


def small(backend):
    """(B, K, L, H): small under the Triton interpreter."""
    return (5, 4, 10, 18) if backend == "triton" else (13, 6, 23, 37)


def problem(B, L, H, dtype=torch.float64, device="cpu", gold_density=0.3, gen=None):
    g = gen or torch.Generator().manual_seed(11)
    u = torch.randn(B, L, dtype=dtype, generator=g)
    p = torch.rand(B, L, dtype=dtype, generator=g)
    y = (torch.rand(B, L, generator=g) < gold_density).to(dtype)
    W = torch.randn(H, L, dtype=dtype, generator=g) * 0.5
    b = torch.randn(H, dtype=dtype, generator=g)
    c = torch.randn(H, dtype=dtype, generator=g)
    return [t.to(device) for t in (u, p, y, W, b, c)]


def run(u, p, y, W, b, c, backend, *, weights_seed=7, **kw):
    """Loss and the gradients (unary, W, b, c) of sum(loss * random weights)."""
    ts = [t.detach().clone().requires_grad_(True) for t in (u, W, b, c)]
    out = slf.sampled_nce_loss(ts[0], p, y, ts[1], ts[2], ts[3], backend=backend, **kw)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(weights_seed))
    (out * w.to(device=out.device, dtype=out.dtype)).sum().backward()
    return out.detach().cpu(), [t.grad.detach().cpu() for t in ts]


# ---------------------------------------------------------------- the generator


def test_philox_matches_random123_known_answers():
    """Philox4x32-10 known-answer vectors of Random123 (kat_vectors): the generator is the standard one."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        out = ref.philox4x32(*[t(c) for c in ctr], key[0] | (key[1] << 32))
        assert tuple(int(w) for w in out) == expected


ATEN_CHECK = r"""
#include <ATen/core/PhiloxRNGEngine.h>
#include <cstdio>
#include "common/seal_math.h"
int main() {
  const uint64_t seed = 0x123456789abcdef0ULL;
  int bad = 0;
  for (uint64_t b : {0ULL, 7ULL, 123456ULL, (1ULL << 32) + 5})
    for (uint32_t k = 0; k < 5; ++k)
      for (uint32_t j = 0; j < 6; ++j) {  // the call with counter j serves labels j + J * word
        at::Philox4_32 eng(seed, /*subsequence=*/b, /*offset=*/(uint64_t(k) << 32) + j);
        auto r = structloss_fast::seal::philox4x32_10(j, k, uint32_t(b), uint32_t(b >> 32), uint32_t(seed),
                                                      uint32_t(seed >> 32));
        const uint32_t w[4] = {r.x0, r.x1, r.x2, r.x3};
        for (int i = 0; i < 4; ++i) bad += eng() != w[i];
      }
  std::printf("%d\n", bad);
  return bad != 0;
}
"""


def test_kernel_generator_is_atens_philox(tmp_path):
    """The kernel's generator (csrc/common/seal_math.h) is ATen's at::Philox4_32: sample k of
    example b, labels j, J + j, 2J + j, 3J + j (J = ceil(L / 4)) = the 4 words of
    at::Philox4_32(seed, subsequence=b, offset=(k << 32) + j)."""
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "check.cpp"
    src.write_text(ATEN_CHECK)
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    exe = tmp_path / "check"
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{csrc}"]
    subprocess.run([cxx, "-std=c++17", "-O1", *flags, str(src), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stdout


@pytest.mark.skipif(not _ext.has_kernel("seal_bernoulli", "CPU"), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 123456789, 2**63 + 12345, 2**64 - 1])
def test_cpu_kernel_draws_the_reference_samples(dtype, seed):
    p = torch.rand(9, 37, dtype=dtype)
    p[0, :5] = torch.tensor([0.0, 1.0, 0.5, 2.0**-24, 1 - 2.0**-24], dtype=dtype)
    out = slf.seal_bernoulli(p, 7, seed=seed)
    assert out.dtype == dtype and out.shape == (9, 7, 37)
    assert torch.equal(out, ref.philox_bernoulli(p, 7, seed))
    assert (out[0, :, 0] == 0).all() and (out[0, :, 1] == 1).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_seeded_loss_is_the_reference_on_the_kernel_samples(backend, device):
    """With the seed torch's generator gives, the kernel scores exactly philox_bernoulli's samples."""
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H, device=device)
    gen_state = torch.Generator().manual_seed(99)
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=gen_state)
    samples = ref.philox_bernoulli(p.cpu(), K, ref.seed_value(seed))
    for use_logq in (True, False):
        out, g = run(u, p, y, W, b, c, backend, num_samples=K, use_logq=use_logq, reduction="none",
                     generator=torch.Generator().manual_seed(99))
        exp, eg = run(*[t.cpu() for t in (u, p, y, W, b, c)], "reference", samples=samples, use_logq=use_logq,
                      reduction="none")
        assert_tight(out, exp, what="loss")
        for a, e in zip(g, eg):
            assert_tight(a, e, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_manual_seed_reproduces_and_seeds_differ(backend, device):
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H, device=device)
    torch.manual_seed(5)
    a = slf.sampled_nce_loss(u, p, y, W, b, c, num_samples=K, reduction="none", backend=backend)
    torch.manual_seed(5)
    a2 = slf.sampled_nce_loss(u, p, y, W, b, c, num_samples=K, reduction="none", backend=backend)
    b_ = slf.sampled_nce_loss(u, p, y, W, b, c, num_samples=K, reduction="none", backend=backend)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b_)


@pytest.mark.skipif(not _ext.has_kernel("seal_bernoulli", "CPU"), reason="extension not built")
def test_sample_mean_matches_p():
    """Bernoulli statistics of the kernel's generator: per-cell means within 5 sigma of p, and the
    overall z-score of the deviations consistent with N(0, 1)."""
    B, K, L = 64, 2000, 24
    p = torch.rand(B, L, dtype=torch.float64)
    p[:, 0], p[:, 1], p[:, 2] = 1e-3, 1 - 1e-3, 0.5
    s = slf.seal_bernoulli(p, K, seed=2024)
    mean = s.mean(1)
    sd = (p * (1 - p) / K).sqrt()
    z = (mean - p) / sd
    assert z.abs().max() < 5.5
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert 0.9 < z.var().item() < 1.1
    # independent across samples and labels: residuals of neighbours uncorrelated
    r = s - p.unsqueeze(1)
    c = torch.corrcoef(torch.stack([r[:, :-1, 3:20].reshape(-1), r[:, 1:, 3:20].reshape(-1)]))[0, 1]
    assert abs(c.item()) < 0.01
    c = torch.corrcoef(torch.stack([r[:, :, 3:19].reshape(-1), r[:, :, 4:20].reshape(-1)]))[0, 1]
    assert abs(c.item()) < 0.01
    c = torch.corrcoef(torch.stack([r[:-1, :, 3:20].reshape(-1), r[1:, :, 3:20].reshape(-1)]))[0, 1]
    assert abs(c.item()) < 0.01


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_fused_kernel_sampling_statistics_via_its_gradient(backend, device):
    """The fused op's own samples, read out of its gradient: with s = 0 and no log q every z_k
    is 0, the softmax is uniform, and d loss / d u_bl = (gold_bl + sum_k y_kl) / (K + 1) - gold_bl.
    With gold = 0, (K + 1) * grad = the number of samples with label l on: its mean is K p."""
    B, K, L = (6, 60, 12) if backend == "triton" else (200, 100, 16)
    p = torch.rand(B, L, dtype=torch.float64)
    p[:, 0] = 0.0
    p[:, 1] = 1.0
    u = torch.zeros(B, L, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.zeros(3, L, dtype=torch.float64, device=device)
    z3 = torch.zeros(3, dtype=torch.float64, device=device)
    loss = slf.sampled_nce_loss(u, p.to(device), torch.zeros_like(p, device=device), W, z3, z3, num_samples=K,
                                use_logq=False, backend=backend)
    assert abs(loss.item() - B * math.log(K + 1)) < 1e-9 * B * math.log(K + 1)
    loss.backward()
    counts = (u.grad.cpu() * (K + 1))
    assert torch.allclose(counts, counts.round(), atol=1e-6)
    counts = counts.round()
    assert (counts[:, 0] == 0).all() and (counts[:, 1] == K).all()
    z = (counts - K * p) / (K * p * (1 - p)).clamp_min(1e-12).sqrt()
    z = z[:, 2:]
    assert z.abs().max() < 5.5
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


# ---------------------------------------------------------------- the energy


@torch.no_grad()
def hand_score(net, x, y):
    """s(x, y) written out with loops: sum_i y_i b_i.T(x) + sum_h c2_h log(1 + exp(sum_l C1_hl y_l + b1_h))."""
    T = net.features(x)
    Bm = net.label_embeddings.weight
    C1, b1, c2 = net.global_linear.weight, net.global_linear.bias, net.global_out
    out = torch.zeros(y.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in y.shape[:-1]]).reshape(-1, y.dim() - 1).tolist():
        b_ = idx[0]
        yy = y[tuple(idx)]
        s = 0.0
        for i in range(y.shape[-1]):
            s += float(yy[i]) * float(Bm[i] @ T[b_])
        for h in range(C1.shape[0]):
            a = float(b1[h]) + sum(float(C1[h, l]) * float(yy[l]) for l in range(y.shape[-1]))
            s += float(c2[h]) * math.log1p(math.exp(a))
        if net.conditional_hidden:
            D1, d1, d2 = net.conditional_linear.weight, net.conditional_linear.bias, net.conditional_out
            v = torch.cat([yy, T[b_]])
            for h in range(D1.shape[0]):
                s += float(d2[h]) * math.log1p(math.exp(float(D1[h] @ v + d1[h])))
        out[tuple(idx)] = s
    return out


@pytest.mark.parametrize("conditional", [0, 5])
def test_energy_matches_hand_written_formula(conditional):
    torch.manual_seed(0)
    net = slf.EnergyNet(6, 4, hidden=7, global_hidden=5, conditional_hidden=conditional).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    y_bin = (torch.rand(3, 4) < 0.5).double()
    y_rel = torch.rand(3, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        for y in (y_bin, y_rel):
            s = net.score(x, y)
            assert s.shape == y.shape[:-1]
            assert_tight(s, hand_score(net, x, y), rtol=1e-12, what="score")
            assert torch.equal(net.energy(x, y), -s)
            assert torch.equal(net(x, y), s)


def test_energy_net_structure_and_init():
    net = slf.EnergyNet(1836, 159)  # the authors' bibtex configuration
    assert net.feature_dim == 400 and net.label_embeddings.weight.shape == (159, 400)
    assert net.global_linear.weight.shape == (200, 159) and net.global_out.shape == (200,)
    drops = [m for m in net.feature_net if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5
    big = slf.EnergyNet(8, 3, global_hidden=20000)
    assert abs(big.global_out.std().item() - math.sqrt(2 / 20000)) < 0.05 * math.sqrt(2 / 20000)
    custom = slf.EnergyNet(8, 3, feature_net=torch.nn.Sequential(torch.nn.Linear(8, 11), torch.nn.Tanh()))
    assert custom.feature_dim == 11 and custom.unary(torch.randn(2, 8)).shape == (2, 3)


def test_score_grad_y_is_the_autograd_gradient():
    torch.manual_seed(1)
    for cond in (0, 6):
        net = slf.EnergyNet(5, 7, hidden=9, global_hidden=8, conditional_hidden=cond).double().eval()
        x = torch.randn(4, 5, dtype=torch.float64)
        y = torch.rand(4, 7, dtype=torch.float64, requires_grad=True)
        g, = torch.autograd.grad(net.score(x, y).sum(), y)
        assert_tight(net.score_grad_y(net.features(x), y), g, rtol=1e-12)


# ---------------------------------------------------------------- NCE against the reference


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("use_logq", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_nce_matches_reference_on_fixed_samples(backend, device, reduction, use_logq, density):
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H, gold_density=density)
    p = p * 0.2 + (0.8 if density > 0.9 else 0.0) if density != 0.5 else p  # sparse / dense / mid samples
    samples = (torch.rand(B, K, L, dtype=torch.float64) < p.unsqueeze(1)).double()
    samples[0, 0] = y[0]  # a sample equal to the gold vector is kept
    dev = [t.to(device) for t in (u, p, y, W, b, c)]
    out, g = run(*dev, backend, samples=samples.to(device), use_logq=use_logq, reduction=reduction)
    exp, eg = run(u, p, y, W, b, c, "reference", samples=samples, use_logq=use_logq, reduction=reduction)
    assert out.shape == exp.shape
    assert_tight(out, exp, what="loss")
    for a, e, name in zip(g, eg, ("unary", "weight", "bias", "out")):
        assert_tight(a, e, rtol=1e-9, atol=1e-12, what=name)


def test_reference_nce_is_the_definition():
    """The reference written once more with explicit sums over samples (on a tiny problem)."""
    B, K, L, H = 2, 3, 4, 3
    u, p, y, W, b, c = problem(B, L, H)
    p[0, 0], y[0, 0] = 0.0, 1.0  # log p clamped at -100 for the gold label
    S = (torch.rand(B, K, L, dtype=torch.float64) < 0.5).double()
    rows = []
    for i in range(B):
        ys = [y[i]] + [S[i, k] for k in range(K)]
        zs = []
        for v in ys:
            s = float(v @ u[i]) + sum(float(c[h]) * math.log1p(math.exp(float(W[h] @ v + b[h]))) for h in range(H))
            lq = sum(float(v[l]) * max(math.log(p[i, l]) if p[i, l] > 0 else -math.inf, -100.0)
                     + (1 - float(v[l])) * max(math.log1p(-float(p[i, l])), -100.0) for l in range(L))
            zs.append(s - lq)
        m = max(zs)
        rows.append(m + math.log(sum(math.exp(z - m) for z in zs)) - zs[0])
    out = ref.nce_ranking_loss(u, p, y, S, W, b, c, reduction="none")
    yy = torch.cat([y.unsqueeze(1), S], 1)
    bce = F.binary_cross_entropy(p.unsqueeze(1).expand_as(yy), yy, reduction="none").sum(-1)
    assert_tight(ref.log_q(p, yy), -bce, rtol=1e-15)  # log q is -BCELoss, clamp included
    assert_tight(out, torch.tensor(rows, dtype=torch.float64), rtol=1e-12)
    assert torch.isfinite(out).all()  # log 0 clamped at -100, as the hand-written sum


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_gradcheck_float64(backend, device, reduction):
    if backend == "triton" and reduction == "mean":
        pytest.skip("interpreter time: 'sum' and 'none' cover the Triton backward")
    B, K, L, H = (3, 2, 4, 3) if backend == "triton" else (5, 3, 7, 9)
    u, p, y, W, b, c = problem(B, L, H, device=device)
    ts = [t.detach().requires_grad_(True) for t in (u, W, b, c)]

    def fn(uu, WW, bb, cc):
        return slf.sampled_nce_loss(uu, p, y, WW, bb, cc, num_samples=K, reduction=reduction, backend=backend,
                                    generator=torch.Generator().manual_seed(3))

    # fast_mode (one random projection) under the Triton interpreter, where each call is slow
    assert torch.autograd.gradcheck(fn, ts, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_float32_within_2x_torch_error(backend, device, scale):
    """scale 12: hidden pre-activations over about +-40, through softplus' threshold at 20 and
    its exp(-|h|) tail."""
    B, K, L, H = (6, 5, 12, 20) if backend == "triton" else (64, 20, 40, 50)
    u, p, y, W, b, c = problem(B, L, H)
    u = u * 3
    W, b = W * scale, b * scale
    samples = (torch.rand(B, K, L, dtype=torch.float64) < p.unsqueeze(1)).double()
    truth, tg = run(u, p, y, W, b, c, "reference", samples=samples, reduction="none")
    f32 = [t.float() for t in (u, p, y, W, b, c)]
    torch32, t32g = run(*f32, "reference", samples=samples.float(), reduction="none")
    out, g = run(*[t.to(device) for t in f32], backend, samples=samples.float().to(device), reduction="none")
    assert out.dtype == torch.float32
    scale = truth.abs().max().item()
    assert_close_to_truth(out, truth, torch32, floor=1e-6 * scale, what="loss")
    for a, e, t, name in zip(g, tg, t32g, ("unary", "weight", "bias", "out")):
        assert_close_to_truth(a, e, t, floor=1e-6 * e.abs().max().item(), what=name)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_torch_error(backend, device, dtype):
    B, K, L, H = (6, 5, 12, 20) if backend == "triton" else (32, 10, 30, 40)
    u, p, y, W, b, c = problem(B, L, H)
    lp = [t.to(dtype) for t in (u, p, y, W, b, c)]
    up = [t.double() for t in lp]  # the truth on the low-precision inputs
    samples = (torch.rand(B, K, L, dtype=torch.float64) < up[1].unsqueeze(1)).double()
    truth, tg = run(*up, "reference", samples=samples, reduction="none")
    torch_lp, tlg = run(*lp, "reference", samples=samples.to(dtype), reduction="none")
    out, g = run(*[t.to(device) for t in lp], backend, samples=samples.to(dtype).to(device), reduction="none")
    assert out.dtype == dtype and all(a.dtype == dtype for a in g)
    assert_close_to_truth(out, truth, torch_lp, what="loss")
    for a, e, t, name in zip(g, tg, tlg, ("unary", "weight", "bias", "out")):
        assert_close_to_truth(a, e, t, what=name)


# ---------------------------------------------------------------- custom-op registration


def _op_args(device, *, B=4, K=3, L=6, H=5, explicit=False, dtype=torch.float64):
    u, p, y, W, b, c = problem(B, L, H, dtype=dtype, device=device)
    u.requires_grad_(True)
    W.requires_grad_(True)
    b.requires_grad_(True)
    c.requires_grad_(True)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    samples = (torch.rand(B, K, L) < 0.4).to(dtype).to(device) if explicit else None
    return u, p, y, W, b, c, seed, samples, K


OPCHECK_CASES = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.skipif(not _ext.has_kernel("seal_nce_loss", "CPU"), reason="extension not built")
@pytest.mark.parametrize("use_logq,compute_grad", OPCHECK_CASES)
@pytest.mark.parametrize("explicit", [False, True])
def test_opcheck_compiled(use_logq, compute_grad, explicit):
    u, p, y, W, b, c, seed, samples, K = _op_args("cpu", explicit=explicit)
    args = (u, p, y, W, b, c, seed, samples, K, use_logq, compute_grad)
    torch.library.opcheck(torch.ops.structloss_fast.seal_nce_loss.default, args)
    stats = torch.ops.structloss_fast.seal_nce_loss(*args)[0].detach()
    w = torch.randn(u.shape[0], dtype=u.dtype)
    bargs = (u.detach(), p, y, W.detach(), b.detach(), c.detach(), seed, samples, K, use_logq, stats, w)
    torch.library.opcheck(torch.ops.structloss_fast.seal_nce_loss_backward.default, bargs)
    torch.library.opcheck(torch.ops.structloss_fast.seal_bernoulli.default, (p, seed, K))


@pytest.mark.parametrize("use_logq,compute_grad", [(True, True), (False, False)])
def test_opcheck_triton(use_logq, compute_grad):
    if not can_run("triton", "seal_nce_loss"):
        pytest.skip("triton unavailable")
    u, p, y, W, b, c, seed, samples, K = _op_args(triton_device(), B=3, K=2, L=5, H=4)
    args = (u, p, y, W, b, c, seed, samples, K, use_logq, compute_grad)
    torch.library.opcheck(torch.ops.structloss_fast.seal_nce_loss_triton.default, args)
    stats = torch.ops.structloss_fast.seal_nce_loss_triton(*args)[0].detach()
    w = torch.randn(u.shape[0], dtype=stats.dtype, device=u.device)
    torch.library.opcheck(torch.ops.structloss_fast.seal_nce_loss_backward_triton.default,
                          (u.detach(), p, y, W.detach(), b.detach(), c.detach(), seed, samples, K, use_logq, stats, w))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_torch_compile_fullgraph(backend, device):
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H, dtype=torch.float32, device=device)
    samples = (torch.rand(B, K, L, device=device) < p.unsqueeze(1)).float()

    def step(uu, WW):
        return slf.sampled_nce_loss(uu * 2.0, p, y, WW, b, c, samples=samples, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    uu = u.clone().requires_grad_(True)
    WW = W.clone().requires_grad_(True)
    out = compiled(uu, WW)
    out.backward()
    g = (uu.grad.clone(), WW.grad.clone())
    uu.grad = WW.grad = None
    expected = step(uu, WW)
    expected.backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g[0], uu.grad, rtol=1e-4, atol=1e-5) and torch.allclose(g[1], WW.grad, rtol=1e-4, atol=1e-5)


def test_auto_uses_the_compiled_kernel_on_cpu(monkeypatch):
    """backend="auto" must not fall back to the reference when the CPU kernel exists."""
    if not _ext.has_kernel("seal_nce_loss", "CPU"):
        pytest.skip("extension not built")
    assert _registry.resolve("seal_nce_loss", "auto", torch.device("cpu")) == "cpu"

    def boom(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(ref, "nce_ranking_loss", boom)
    monkeypatch.setattr(ref, "philox_bernoulli", boom)
    u, p, y, W, b, c = problem(4, 5, 6, dtype=torch.float32)
    slf.sampled_nce_loss(u, p, y, W, b, c)
    net = slf.EnergyNet(3, 5, hidden=4, global_hidden=6)
    slf.nce_ranking_loss(net, torch.randn(4, 3), p, y)


def test_unavailable_backend_raises():
    u, p, y, W, b, c = problem(4, 5, 6, dtype=torch.float32)
    with pytest.raises(slf.BackendUnavailable, match="cuda"):
        slf.sampled_nce_loss(u, p, y, W, b, c, backend="cuda")
    net = slf.EnergyNet(3, 5, hidden=4, global_hidden=6, conditional_hidden=3)
    with pytest.raises(slf.BackendUnavailable, match="conditional"):
        slf.nce_ranking_loss(net, torch.randn(4, 3), p, y, backend="cpu")


# ---------------------------------------------------------------- edge cases and non-finite input


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_empty_batch(backend, device, reduction):
    u, p, y, W, b, c = problem(0, 5, 6, device=device)
    uu = u.requires_grad_(True)
    loss = slf.sampled_nce_loss(uu, p, y, W, b, c, num_samples=3, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction == "sum":
        assert loss.item() == 0.0
        loss.backward()
        assert uu.grad.shape == (0, 5)
    if reduction == "mean":
        assert math.isnan(loss.item())  # torch's mean of nothing


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 1, 3), (3, 2, 17, 1), (1, 7, 5, 40)])
def test_small_and_odd_sizes(backend, device, shape):
    B, K, L, H = shape
    u, p, y, W, b, c = problem(B, L, H)
    samples = (torch.rand(B, K, L, dtype=torch.float64) < p.unsqueeze(1)).double()
    out, g = run(*[t.to(device) for t in (u, p, y, W, b, c)], backend, samples=samples.to(device), reduction="none")
    exp, eg = run(u, p, y, W, b, c, "reference", samples=samples, reduction="none")
    assert_tight(out, exp)
    for a, e in zip(g, eg):
        assert_tight(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs_and_bool_samples(backend, device):
    B, K, L, H = small(backend)
    big = problem(2 * B, 2 * L, 2 * H)
    u, p, y = (t[::2, 1::2] for t in big[:3])
    W = big[3][::2, ::2]
    b, c = big[4][::2], big[5][1::2]
    assert not u.is_contiguous() and not W.is_contiguous()
    S = torch.rand(B, L, K) < 0.5
    samples = S.transpose(1, 2)  # non-contiguous bool
    out, g = run(*[t.to(device) for t in (u, p, y, W, b, c)], backend, samples=samples.to(device), reduction="none")
    exp, eg = run(u.contiguous(), p, y, W.contiguous(), b, c, "reference", samples=samples.double(),
                  reduction="none")
    assert_tight(out, exp)
    for a, e in zip(g, eg):
        assert_tight(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_probabilities_at_0_and_1_clamp_like_bce(backend, device):
    """p = 0 with a gold label on, p = 1 with it off: log clamped at -100 as torch's BCELoss."""
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H)
    p[:, 0], y[:, 0] = 0.0, 1.0
    p[:, 1], y[:, 1] = 1.0, 0.0
    samples = (torch.rand(B, K, L, dtype=torch.float64) < p.unsqueeze(1)).double()
    out, _ = run(*[t.to(device) for t in (u, p, y, W, b, c)], backend, samples=samples.to(device), reduction="none")
    logq_gold = -F.binary_cross_entropy(p, y, reduction="none").sum(-1)
    assert (logq_gold < -199).all()
    # z_0 = s(y*) + 200: the gold vector, impossible under q, dominates every sample
    assert torch.isfinite(out).all() and (out < 1e-50).all()
    exp, _ = run(u, p, y, W, b, c, "reference", samples=samples, reduction="none")
    assert_tight(out, exp)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("where", ["unary", "probs", "weight"])
@pytest.mark.parametrize("use_logq", [True, False])
def test_non_finite_input_gives_non_finite_loss(backend, device, where, use_logq):
    B, K, L, H = small(backend)
    u, p, y, W, b, c = problem(B, L, H, dtype=torch.float32)
    {"unary": u, "probs": p, "weight": W}[where][1, 2] = float("nan")
    loss = slf.sampled_nce_loss(*[t.to(device) for t in (u, p, y, W, b, c)], num_samples=K, use_logq=use_logq,
                                reduction="none", backend=backend)
    assert not torch.isfinite(loss[1]).item()
    if where != "weight":
        assert torch.isfinite(loss[0]).item()


@pytest.mark.skipif(not _ext.has_kernel("seal_nce_loss", "CPU"), reason="extension not built")
def test_cpu_is_deterministic_and_thread_count_independent():
    B, K, L, H = 300, 8, 40, 50  # several chunks of examples
    u, p, y, W, b, c = problem(B, L, H, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = run(u, p, y, W, b, c, "cpu", num_samples=K, generator=torch.Generator().manual_seed(1))
        torch.set_num_threads(max(threads, 2))
        a2, ga2 = run(u, p, y, W, b, c, "cpu", num_samples=K, generator=torch.Generator().manual_seed(1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, a2) and all(torch.equal(x, z) for x, z in zip(ga, ga2))
    exp, eg = run(u.double(), p.double(), y.double(), W.double(), b.double(), c.double(), "reference",
                  samples=ref.philox_bernoulli(p, K, ref.seed_value(
                      torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(1)))).double())
    assert abs(a.item() - exp.item()) <= 1e-5 * abs(exp.item())
    for x, e in zip(ga, eg):
        assert max_abs(x, e) <= 1e-4 * e.abs().max().item()


# ---------------------------------------------------------------- regression, margin and task losses


def test_regression_loss_matches_formula():
    torch.manual_seed(2)
    net = slf.EnergyNet(6, 5, hidden=8, global_hidden=7).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    p = torch.rand(4, 5, dtype=torch.float64)
    y = (torch.rand(4, 5) < 0.5).double()
    y[0] = 0  # soft-F1 with an empty gold vector
    out = slf.regression_loss(net, x, p, y, reduction="none")
    s = net.score(x, p)
    mn, mx = torch.minimum(p, y).sum(-1), torch.maximum(p, y).sum(-1)
    f1 = 2 * mn / (mn + mx)
    expected = -(f1 * F.logsigmoid(s) + (1 - f1) * F.logsigmoid(-s))
    assert_tight(out, expected, rtol=1e-12)
    assert_tight(slf.regression_loss(net, x, p, y), expected.mean(), rtol=1e-12)
    assert abs(slf.seal.soft_f1(y[1:2], y[1:2]).item() - 1.0) < 1e-15


@pytest.mark.parametrize("delta", ["manhattan", "soft_f1"])
def test_margin_loss_matches_formula(delta):
    torch.manual_seed(3)
    net = slf.EnergyNet(6, 5, hidden=8, global_hidden=7).double().eval()
    x = torch.randn(6, 6, dtype=torch.float64)
    y = (torch.rand(6, 5) < 0.5).double()
    y_ca = torch.rand(6, 5, dtype=torch.float64)
    y_hat = torch.rand(6, 5, dtype=torch.float64)
    out = slf.margin_loss(net, x, y, y_ca, prediction=y_hat, lambda_p=0.7, delta=delta, reduction="none")
    d = (y_ca - y).abs().mean(-1) if delta == "manhattan" else 1 - slf.seal.soft_f1(y_ca, y)
    expected = torch.relu(d - net.score(x, y) + net.score(x, y_ca)) + 0.7 * torch.relu(net.score(x, y_hat)
                                                                                       - net.score(x, y))
    assert_tight(out, expected, rtol=1e-12)
    no_p = slf.margin_loss(net, x, y, y_ca, delta=delta, reduction="sum")
    assert_tight(no_p, torch.relu(d - net.score(x, y) + net.score(x, y_ca)).sum(), rtol=1e-12)
    # zero-truncated: y_ca = y* gives a zero loss
    assert slf.margin_loss(net, x, y, y, delta=delta).item() == 0.0


def test_margin_loss_gradients_reach_the_cost_augmented_net():
    torch.manual_seed(4)
    net = slf.EnergyNet(6, 5, hidden=8, global_hidden=7)
    ca = slf.CostAugmentedNet(5, hidden=9)
    x, y = torch.randn(6, 6), (torch.rand(6, 5) < 0.5).float()
    logits = torch.randn(6, 5)
    y_ca = ca(logits, y)
    assert y_ca.shape == (6, 5) and ((y_ca > 0) & (y_ca < 1)).all()
    (-slf.margin_loss(net, x, y, y_ca, delta="manhattan")).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ca.parameters())


@pytest.mark.parametrize("variant", ["score", "regression"])
def test_task_loss_matches_formula(variant):
    torch.manual_seed(5)
    net = slf.EnergyNet(6, 5, hidden=8, global_hidden=7).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(4, 5) < 0.5).double()
    out = slf.seal_task_loss(net, x, logits, y, weight=5.51, variant=variant)
    s = net.score(x, torch.sigmoid(logits))
    e = -torch.sigmoid(s) if variant == "regression" else -s
    bce = -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).sum(-1)
    assert_tight(out, (5.51 * e + bce).mean(), rtol=1e-12)
    out.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_nce_with_conditional_term_uses_its_definition():
    torch.manual_seed(6)
    net = slf.EnergyNet(4, 6, hidden=5, global_hidden=7, conditional_hidden=3).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    p = torch.rand(3, 6, dtype=torch.float64)
    y = (torch.rand(3, 6) < 0.5).double()
    S = (torch.rand(3, 4, 6) < 0.5).double()
    out = slf.nce_ranking_loss(net, x, p, y, samples=S, reduction="none")
    yy = torch.cat([y.unsqueeze(1), S], 1)
    z = hand_score(net, x, yy) - ref.log_q(p, yy)
    assert_tight(out, torch.logsumexp(z, 1) - z[:, 0], rtol=1e-10)


def test_nce_module_and_energy_loss_agree():
    torch.manual_seed(7)
    net = slf.EnergyNet(4, 6, hidden=5, global_hidden=7).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    p = torch.rand(3, 6, dtype=torch.float64)
    y = (torch.rand(3, 6) < 0.5).double()
    S = (torch.rand(3, 4, 6) < 0.5).double()
    mod = slf.NCERankingLoss(num_samples=4, use_logq=False)
    a = mod(net, x, p, y, samples=S)
    expected = ref.nce_ranking_loss(net.unary(x), p, y, S, net.global_linear.weight, net.global_linear.bias,
                                    net.global_out, use_logq=False)
    assert_tight(a, expected, rtol=1e-12)
    assert "use_logq=False" in repr(mod)


# ---------------------------------------------------------------- SPEN gradient-based inference


def convex_energy_net(L=8, H=6):
    """s concave in y (E convex): c2 <= 0 makes c2^T softplus(C1 y + b1) concave."""
    torch.manual_seed(8)
    net = slf.EnergyNet(5, L, hidden=6, global_hidden=H).double().eval()
    with torch.no_grad():
        net.global_out.copy_(-net.global_out.abs())
    return net


@pytest.mark.parametrize("method", ["entropic", "projected"])
def test_gbi_decreases_a_convex_energy_monotonically(method):
    net = convex_energy_net()
    x = torch.randn(16, 5, dtype=torch.float64)
    y, trace = slf.gbi_inference(net, x, steps=40, step_size=0.05, method=method, return_trace=True)
    energies = -torch.stack(trace)  # (steps + 1, B)
    assert ((energies[1:] - energies[:-1]) <= 1e-12).all(), "energy went up"
    assert (energies[-1] < energies[0] - 1e-3).all()
    assert ((y > 0) & (y < 1)).all()
    # the limit is the box-constrained minimiser: no feasible first-order descent direction left
    y_long = slf.gbi_inference(net, x, steps=3000, step_size=0.2, method="projected")
    g = net.score_grad_y(net.features(x), y_long)
    interior = (y_long > 2e-3) & (y_long < 1 - 2e-3)
    assert g[interior].abs().max() < 1e-3


def test_gbi_cost_augmented_and_init_options():
    net = convex_energy_net()
    x = torch.randn(4, 5, dtype=torch.float64)
    y_star = (torch.rand(4, 8) < 0.5).double()
    plain = slf.gbi_inference(net, x, steps=10)
    aug, trace = slf.gbi_inference(net, x, steps=10, cost_labels=y_star, return_trace=True)
    assert not torch.allclose(plain, aug)
    with torch.no_grad():
        f = net.features(x)
        obj = net.score_from_features(f, aug) + 1 - slf.seal.soft_f1(aug, y_star)
    assert_tight(trace[-1], obj, rtol=1e-12)
    init = torch.full((4, 8), 0.3, dtype=torch.float64)
    assert torch.allclose(slf.gbi_inference(net, x, steps=0, init=init), init)
    un = slf.gbi_inference(net, x, steps=0, init="unary")
    assert torch.allclose(un, torch.sigmoid(net.unary(x)))


# ---------------------------------------------------------------- bad input


def _bad(**changes):
    u, p, y, W, b, c = problem(4, 5, 6, dtype=torch.float32)
    kw = dict(unary=u, probs=p, labels=y, global_weight=W, global_bias=b, global_out=c)
    kw.update(changes)
    return kw


BAD = [
    (dict(labels=torch.full((4, 5), 1.5)), ValueError, "labels must lie in \\[0, 1\\]"),
    (dict(labels=torch.full((4, 5), -0.1)), ValueError, "labels must lie in \\[0, 1\\]"),
    (dict(probs=torch.full((4, 5), 1.01)), ValueError, "probs must lie in \\[0, 1\\]"),
    (dict(probs=torch.full((4, 5), float("inf"))), ValueError, "probs must lie"),
    (dict(probs=torch.rand(4, 6)), ValueError, "probs must have the shape of unary"),
    (dict(labels=torch.rand(3, 5)), ValueError, "labels must have the shape of unary"),
    (dict(global_weight=torch.rand(6, 4)), ValueError, "global_weight must be \\(H, L\\)"),
    (dict(global_bias=torch.rand(5)), ValueError, "global_bias must have the shape"),
    (dict(global_out=torch.rand(6, 1)), ValueError, "global_out must be 1-D"),
    (dict(unary=torch.rand(4, 5, 1)), ValueError, "unary must be 2-D"),
    (dict(unary=torch.ones(4, 5, dtype=torch.long)), TypeError, "unary must be float"),
    (dict(probs=torch.ones(4, 5, dtype=torch.long)), TypeError, "probs must be float"),
    (dict(num_samples=0), ValueError, "num_samples \\(K\\) must be >= 1"),
    (dict(num_samples=-3), ValueError, "num_samples \\(K\\) must be >= 1"),
    (dict(num_samples=2.5), TypeError, "num_samples must be an int"),
    (dict(samples=torch.rand(4, 3, 5)), ValueError, "samples must hold only 0 and 1"),
    (dict(samples=torch.ones(4, 3, 6)), ValueError, "samples must be \\(B, K, L\\)"),
    (dict(samples=torch.ones(4, 0, 5)), ValueError, "K >= 1"),
    (dict(samples=torch.ones(4, 3, 5), num_samples=4), ValueError, "num_samples \\(4\\) differs"),
    (dict(samples=torch.ones(4, 3, 5, dtype=torch.long)), TypeError, "samples must be a float or bool"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(use_logq=1), TypeError, "use_logq must be a bool"),
]


@pytest.mark.parametrize("changes,exc,match", BAD)
def test_bad_input_raises_clear_error(changes, exc, match):
    kw = _bad(**changes)
    u, p, y, W, b, c = (kw.pop(k) for k in ("unary", "probs", "labels", "global_weight", "global_bias", "global_out"))
    with pytest.raises(exc, match=match):
        slf.sampled_nce_loss(u, p, y, W, b, c, **kw)


def test_bad_input_to_the_energy_losses():
    net = slf.EnergyNet(3, 5, hidden=4, global_hidden=6)
    x, p, y = torch.randn(4, 3), torch.rand(4, 5), (torch.rand(4, 5) < 0.5).float()
    with pytest.raises(ValueError, match="x must be \\(B, n_features\\)"):
        net.score(torch.randn(4, 7), y)
    with pytest.raises(ValueError, match="y must be \\(B, L\\) or \\(B, K, L\\)"):
        net.score(x, torch.rand(4, 6))
    with pytest.raises(ValueError, match="probs must be \\(B, L\\)"):
        slf.nce_ranking_loss(net, x, torch.rand(4, 6), y)
    with pytest.raises(ValueError, match="labels must lie in"):
        slf.nce_ranking_loss(net, x, p, y * 2)
    with pytest.raises(ValueError, match="num_samples"):
        slf.nce_ranking_loss(net, x, p, y, num_samples=0)
    with pytest.raises(TypeError, match="energy must be a structloss_fast.EnergyNet"):
        slf.regression_loss(torch.nn.Linear(3, 5), x, p, y)
    with pytest.raises(ValueError, match="cost_augmented must lie in"):
        slf.margin_loss(net, x, y, p + 1)
    with pytest.raises(ValueError, match="delta must be"):
        slf.margin_loss(net, x, y, p, delta="hamming")
    with pytest.raises(ValueError, match="lambda_p must be >= 0"):
        slf.margin_loss(net, x, y, p, lambda_p=-1.0)
    with pytest.raises(ValueError, match="variant must be"):
        slf.seal_task_loss(net, x, torch.randn(4, 5), y, variant="dvn")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        slf.seal_task_loss(net, x, torch.randn(4, 5), y, weight=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        slf.gbi_inference(net, x, steps=-1)
    with pytest.raises(ValueError, match="method must be"):
        slf.gbi_inference(net, x, method="adam")
    with pytest.raises(ValueError, match="n_labels must be an int >= 1"):
        slf.EnergyNet(3, 0)
    with pytest.raises(ValueError, match="dropout must be < 1"):
        slf.EnergyNet(3, 2, dropout=1.0)

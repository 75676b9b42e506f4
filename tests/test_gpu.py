"""What only a GPU shows, run by `make gpu-check` (every test here is marked gpu and skipped
without a CUDA device): the kernels launch from every configuration table entry, meet the
accuracy criterion with the GPU's own arithmetic (3xTF32 products, bf16 tensor cores, fast
exp/log), synchronize nothing with the host, can be captured in a CUDA graph, run on the
inputs' device when it is not the current one, and index past 2^31 elements.

The parity tests of each family (tests/<family>/) also run on the GPU through their CUDA-device
parameters; these are the checks that have no CPU counterpart.
"""
from __future__ import annotations

import pytest
import torch

import structloss_fast as slf
from tests.helpers import assert_close_to_truth, assert_tight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
PAIRWISE_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _pairwise_batch(B, D, dtype, seed=0, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(B // 4, 2), (B,), generator=g)
    return x.to(device=device, dtype=dtype), y.to(device)


def _loss_and_grad(fn, x, *args, **kw):
    x = x.detach().requires_grad_(True)
    out = fn(x, *args, **kw)
    g, = torch.autograd.grad(out, x)
    return out.detach(), g


# ---------------------------------------------------------------- every table entry launches


def _entries(module):
    return [pytest.param(e, id=e.describe().replace(" ", "")) for e in module.GPU_TABLE]


def _size_for(entry, below=None):
    """A size the table maps to this entry (its bound, or past the previous entry's)."""
    return entry.max_size if entry.max_size is not None else (below or 1000) + 37


@pytest.mark.parametrize("loss", ["circle_loss", "supcon_loss", "contrastive_loss", "triplet_margin_loss"])
@pytest.mark.parametrize("dtype", PAIRWISE_DTYPES)
@pytest.mark.parametrize("D", [64, 200, 777])
def test_pairwise_every_entry_launches_and_matches(loss, dtype, D):
    from structloss_fast.pairwise import _triton, reference

    assert _triton.check_supported(torch.empty(2, D, device=CUDA, dtype=dtype), 0) is None
    kw = {"mining": "batch_hard"} if loss == "triplet_margin_loss" else {}
    x, y = _pairwise_batch(300, D, dtype)
    out, g = _loss_and_grad(getattr(slf, loss), x, y, backend="triton", **kw)
    truth, g_truth = _loss_and_grad(getattr(reference, loss), x.double().cpu(), y.cpu(), **kw)
    same, g_same = _loss_and_grad(getattr(reference, loss), x.cpu(), y.cpu(), **kw)
    if dtype == torch.float64:
        assert_tight(out, truth, rtol=1e-10, what="loss")
        assert_tight(g, g_truth, rtol=1e-9, atol=1e-12, what="grad")
    else:  # the criterion: at most 2x PyTorch's own error in this dtype (fp32 via 3xTF32)
        assert_close_to_truth(out, truth, same, floor=1e-6, what=f"{loss} {dtype} loss")
        assert_close_to_truth(g, g_truth, g_same, floor=1e-6, what=f"{loss} {dtype} grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("C", [100, 3000, 50000])
def test_softmax_every_entry_launches_and_matches(dtype, C):
    from structloss_fast.softmax import reference

    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(64, C, generator=g, dtype=torch.float64)).to(CUDA, dtype)
    y = torch.randint(0, C, (64,), generator=g).to(CUDA)
    out, gr = _loss_and_grad(slf.encouraging_loss, x, y, label_smoothing=0.1, backend="triton")
    truth, g_truth = _loss_and_grad(reference.encouraging_loss, x.double(), y, label_smoothing=0.1)
    same, g_same = _loss_and_grad(reference.encouraging_loss, x, y, label_smoothing=0.1)
    if dtype == torch.float64:
        assert_tight(out, truth, rtol=1e-11, what="loss")
    else:
        assert_close_to_truth(out, truth, same, floor=1e-6, what="loss")
        assert_close_to_truth(gr, g_truth, g_same, floor=1e-7, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L,K", [(159, 20), (300, 3), (1024, 20), (256, 255)])
def test_seal_every_entry_launches_and_matches(dtype, L, K):
    g = torch.Generator().manual_seed(2)
    B, H = 33, 200
    args = [torch.randn(B, L, generator=g, dtype=torch.float64), torch.rand(B, L, generator=g, dtype=torch.float64),
            (torch.rand(B, L, generator=g) < 0.1).double(), 0.1 * torch.randn(H, L, generator=g, dtype=torch.float64),
            torch.randn(H, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)]
    cuda_args = [a.to(CUDA, dtype).requires_grad_(i in (0, 3)) for i, a in enumerate(args)]
    samples = slf.seal_bernoulli(cuda_args[1].detach(), K, seed=12345)
    out = slf.sampled_nce_loss(*cuda_args, samples=samples, backend="triton")
    gu, gw = torch.autograd.grad(out, [cuda_args[0], cuda_args[3]])
    ref_args = [a.detach().cpu().double().requires_grad_(i in (0, 3)) for i, a in enumerate(cuda_args)]
    expected = slf.sampled_nce_loss(*ref_args, samples=samples.cpu().double(), backend="reference")
    eu, ew = torch.autograd.grad(expected, [ref_args[0], ref_args[3]])
    rtol = 1e-10 if dtype == torch.float64 else 2e-5  # 3xTF32 products, fp32 accumulation over L and H
    assert_tight(out, expected, rtol=rtol, what="loss")
    assert_tight(gu, eu, rtol=rtol * 10, atol=1e-12, what="grad unary")
    assert_tight(gw, ew, rtol=rtol * 10, atol=1e-12, what="grad weight")


def test_seal_bernoulli_on_the_gpu_matches_the_cpu_kernel():
    p = torch.rand(37, 159, dtype=torch.float64)
    on_gpu = slf.seal_bernoulli(p.to(CUDA), 20, seed=2**63 + 5)
    on_cpu = slf.seal_bernoulli(p, 20, seed=2**63 + 5)
    assert torch.equal(on_gpu.cpu(), on_cpu)


# ---------------------------------------------------------------- no host synchronisation


def _no_sync(fn):
    """fn() under torch.cuda.set_sync_debug_mode("error"): any synchronizing CUDA call (an
    .item(), a copy to the host, a pageable host-to-device copy) raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _ops_to_check():
    x, y = _pairwise_batch(256, 64, torch.bfloat16)
    logits = torch.randn(64, 1000, device=CUDA)
    tgt = torch.randint(0, 1000, (64,), device=CUDA)
    h = torch.randn(64, 32, device=CUDA)
    W = torch.randn(1000, 32, device=CUDA)
    u = torch.randn(16, 40, device=CUDA)
    p = torch.rand(16, 40, device=CUDA)
    lab = (torch.rand(16, 40, device=CUDA) < 0.2).float()
    C1, b1, c2 = torch.randn(30, 40, device=CUDA), torch.randn(30, device=CUDA), torch.randn(30, device=CUDA)
    return {
        "circle_loss": lambda: slf.circle_loss(x, y, backend="triton"),
        "circle_loss (cuda)": lambda: slf.circle_loss(x.float(), y, backend="cuda"),
        "supcon_loss": lambda: slf.supcon_loss(x, y, backend="triton"),
        "ntxent_loss": lambda: slf.ntxent_loss(x, y, backend="triton"),
        "encouraging_loss": lambda: slf.encouraging_loss(logits, tgt, backend="triton"),
        "linear_encouraging_loss": lambda: slf.linear_encouraging_loss(h, W, tgt, backend="triton"),
        "sampled_nce_loss": lambda: slf.sampled_nce_loss(u, p, lab, C1, b1, c2, backend="triton"),
        "seal_bernoulli": lambda: slf.seal_bernoulli(p, 5),
    }


@pytest.mark.parametrize("name", list(_ops_to_check()) if torch.cuda.is_available() else [])
def test_no_host_synchronisation(name):
    fn = _ops_to_check()[name]
    fn()  # compile first (the JIT's first launch may query the device)
    _no_sync(fn)


@pytest.mark.parametrize("name", ["circle_loss", "encouraging_loss", "linear_encouraging_loss", "sampled_nce_loss"])
def test_backward_has_no_host_synchronisation(name):
    x, y = _pairwise_batch(256, 64, torch.bfloat16)
    x.requires_grad_(True)
    logits = torch.randn(64, 1000, device=CUDA, requires_grad=True)
    tgt = torch.randint(0, 1000, (64,), device=CUDA)
    h = torch.randn(64, 32, device=CUDA, requires_grad=True)
    W = torch.randn(1000, 32, device=CUDA, requires_grad=True)
    u = torch.randn(16, 40, device=CUDA, requires_grad=True)
    p = torch.rand(16, 40, device=CUDA)
    lab = (torch.rand(16, 40, device=CUDA) < 0.2).float()
    C1, b1, c2 = torch.randn(30, 40, device=CUDA), torch.randn(30, device=CUDA), torch.randn(30, device=CUDA)
    step = {
        "circle_loss": lambda: slf.circle_loss(x, y, backend="triton").backward(),
        "encouraging_loss": lambda: slf.encouraging_loss(logits, tgt, backend="triton").backward(),
        "linear_encouraging_loss": lambda: slf.linear_encouraging_loss(h, W, tgt, backend="triton").backward(),
        "sampled_nce_loss": lambda: slf.sampled_nce_loss(u, p, lab, C1, b1, c2, backend="triton").backward(),
    }[name]
    step()
    _no_sync(step)


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("name", ["circle_loss", "supcon_loss", "encouraging_loss", "linear_encouraging_loss",
                                  "sampled_nce_loss_given_samples"])
def test_forward_backward_capturable_in_a_cuda_graph(name):
    torch.manual_seed(0)
    x, y = _pairwise_batch(256, 64, torch.bfloat16)
    logits = torch.randn(64, 1000, device=CUDA)
    tgt = torch.randint(0, 1000, (64,), device=CUDA)
    h, W = torch.randn(64, 32, device=CUDA), torch.randn(1000, 32, device=CUDA)
    u, p = torch.randn(16, 40, device=CUDA), torch.rand(16, 40, device=CUDA)
    lab = (torch.rand(16, 40, device=CUDA) < 0.2).float()
    C1, b1, c2 = torch.randn(30, 40, device=CUDA), torch.randn(30, device=CUDA), torch.randn(30, device=CUDA)
    samples = slf.seal_bernoulli(p, 6, seed=7)
    inputs, fn = {
        "circle_loss": ([x], lambda t: slf.circle_loss(t[0], y, backend="triton")),
        "supcon_loss": ([x], lambda t: slf.supcon_loss(t[0], y, backend="triton")),
        "encouraging_loss": ([logits], lambda t: slf.encouraging_loss(t[0], tgt, backend="triton")),
        "linear_encouraging_loss": ([h, W], lambda t: slf.linear_encouraging_loss(t[0], t[1], tgt, backend="triton")),
        "sampled_nce_loss_given_samples": ([u, C1], lambda t: slf.sampled_nce_loss(
            t[0], p, lab, t[1], b1, c2, samples=samples, backend="triton")),
    }[name]
    static = [t.detach().clone().requires_grad_(True) for t in inputs]

    def step():
        out = fn(static)
        return (out.detach(),) + torch.autograd.grad(out, static)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (compiles) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new = [torch.randn_like(t) for t in static]
    for s, n in zip(static, new):
        with torch.no_grad():
            s.copy_(n)
    graph.replay()
    eager_in = [n.detach().clone().requires_grad_(True) for n in new]
    eager = fn(eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in)
    assert_tight(captured[0], eager.detach(), rtol=1e-5, atol=1e-6, what="replayed loss")
    for c, e in zip(captured[1:], eager_grads):
        assert_tight(c, e, rtol=1e-5, atol=1e-6, what="replayed gradient")


def test_drawn_samples_capturable_in_a_cuda_graph():
    """The seed is drawn on the device (graph-safe RNG): each replay draws new samples."""
    u = torch.randn(16, 40, device=CUDA, requires_grad=True)
    p = torch.rand(16, 40, device=CUDA)
    lab = (torch.rand(16, 40, device=CUDA) < 0.2).float()
    C1, b1, c2 = torch.randn(30, 40, device=CUDA), torch.randn(30, device=CUDA), torch.randn(30, device=CUDA)

    def step():
        out = slf.sampled_nce_loss(u, p, lab, C1, b1, c2, num_samples=8, backend="triton")
        return out.detach(), torch.autograd.grad(out, u)[0]

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    graph.replay()
    first = loss.clone()
    graph.replay()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert not torch.equal(first, loss), "each replay draws a new seed"


# ---------------------------------------------------------------- the inputs' device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_inputs_device():
    dev1 = torch.device("cuda:1")
    x, y = _pairwise_batch(128, 64, torch.float32, device=dev1)
    logits = torch.randn(32, 500, device=dev1)
    tgt = torch.randint(0, 500, (32,), device=dev1)
    with torch.cuda.device(0):
        a = slf.circle_loss(x, y, backend="triton")
        b = slf.encouraging_loss(logits, tgt, backend="triton")
    assert a.device == dev1 and b.device == dev1
    assert_tight(a.cpu(), slf.circle_loss(x.cpu(), y.cpu(), backend="cpu"), rtol=1e-5)
    assert_tight(b.cpu(), slf.encouraging_loss(logits.cpu(), tgt.cpu(), backend="cpu"), rtol=1e-5)


# ---------------------------------------------------------------- offsets past 2^31


def test_pairwise_indexes_past_two_to_the_31():
    """B * D > 2^31 elements (4 GiB of bf16 embeddings): rows past the 32-bit offset range
    read and write their own data."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    D = 256
    B = (1 << 31) // D + 64
    x = torch.empty(B, D, device=CUDA, dtype=torch.bfloat16)
    x.normal_()
    y = torch.arange(B, device=CUDA) % 1000
    tail = slice(B - 64, B)
    ref = x[: 4096]
    rl = y[: 4096]
    stats = slf.pairwise.losses.loss_terms("circle", dict(m=0.4, gamma=80.0), x[tail].contiguous(), y[tail], ref, rl,
                                           backend="triton")[0]
    big = slf.pairwise.losses.loss_terms("circle", dict(m=0.4, gamma=80.0), x, y, ref, rl, backend="triton")[0]
    assert_tight(big[tail].float().cpu(), stats.float().cpu(), rtol=1e-3, atol=1e-3, what="rows past 2^31")


# ---------------------------------------------------------------- NaN on the GPU's arithmetic


@pytest.mark.parametrize("loss", ["circle_loss", "contrastive_loss", "triplet_margin_loss", "supcon_loss"])
def test_pairwise_nan_input_gives_nan(loss):
    x, y = _pairwise_batch(64, 32, torch.float32)
    x[5, 3] = float("nan")
    kw = {"mining": "batch_hard"} if loss == "triplet_margin_loss" else {}
    assert torch.isnan(getattr(slf, loss)(x, y, backend="triton", **kw))


def test_softmax_and_seal_nan_input_gives_nan():
    logits = torch.randn(16, 300, device=CUDA)
    logits[3, 7] = float("nan")
    assert torch.isnan(slf.encouraging_loss(logits, torch.randint(0, 300, (16,), device=CUDA), backend="triton"))
    u = torch.randn(8, 40, device=CUDA)
    u[2, 5] = float("nan")
    p = torch.rand(8, 40, device=CUDA)
    lab = (torch.rand(8, 40, device=CUDA) < 0.2).float()
    C1, b1, c2 = torch.randn(30, 40, device=CUDA), torch.randn(30, device=CUDA), torch.randn(30, device=CUDA)
    assert torch.isnan(slf.sampled_nce_loss(u, p, lab, C1, b1, c2, backend="triton"))


# ---------------------------------------------------------------- zero embeddings


def test_pairwise_zero_rows_on_the_gpu():
    """A zero embedding normalizes to the zero vector: at distance 1 from every unit row (PML's
    cdist on F.normalize'd rows), as the interpreter test (tests/pairwise/test_zero_rows.py)
    checks against PML on the CPU."""
    x, y = _pairwise_batch(32, 16, torch.float64)
    x[0] = 0
    gpu = slf.contrastive_loss(x, y, backend="triton", reduction="none")
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    expected = pml.ContrastiveLoss()(x, y)
    assert_tight(slf.contrastive_loss(x, y, backend="triton"), expected, rtol=1e-10)
    assert torch.isfinite(gpu).all()

"""JEM: the replay buffer's semantics, the SGLD sampler (eval mode, gradient wrt x only,
write-back, stationary moments on a known energy), the objective, the trainer (divergence
detection), the evaluation helpers (ECE by hand, AUROC against scikit-learn, PGD against the
closed form on linear models) and a short run of the digits example."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structloss_fast as slf
from structloss_fast.jem import evaluation as jem_eval
from structloss_fast.jem import training as jem
from structloss_fast.jem.models import SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and far faster when the cores are shared
    (OpenMP waits on descheduled threads). Correctness does not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- ReplayBuffer


def test_buffer_initialisation_uniform():
    buf = jem.ReplayBuffer(500, (2, 3), generator=torch.Generator().manual_seed(0))
    assert buf.buffer.shape == (500, 2, 3) and buf.buffer.dtype == torch.float32
    assert buf.buffer.min() >= -1 and buf.buffer.max() <= 1
    assert abs(buf.buffer.mean().item()) < 0.05 and abs(buf.buffer.var().item() - 1 / 3) < 0.03


def test_buffer_sample_with_replacement_and_no_reinit():
    buf = jem.ReplayBuffer(10, (4,), reinit_freq=0.0)
    x0, idx = buf.sample(200)
    assert idx.shape == (200,) and idx.min() >= 0 and idx.max() < 10
    assert torch.unique(idx).numel() < 200  # with replacement: duplicates
    assert torch.equal(x0, buf.buffer[idx])
    x0[0] += 100  # a new tensor: the buffer is untouched
    assert buf.buffer.abs().max() <= 1


def test_buffer_reinit_fraction():
    buf = jem.ReplayBuffer(1000, (3,), reinit_freq=0.05, generator=torch.Generator().manual_seed(1))
    buf.buffer.fill_(5.0)
    x0, _ = buf.sample(40000)
    fresh = (x0 != 5.0).all(1).double()
    assert ((x0 == 5.0).all(1) | (x0.abs() <= 1).all(1)).all()  # each row all-buffer or all-fresh
    p = fresh.mean().item()
    assert abs(p - 0.05) < 5 * math.sqrt(0.05 * 0.95 / 40000)
    buf.reinit_freq = 1.0
    assert (buf.sample(100)[0].abs() <= 1).all()


def test_buffer_class_blocks():
    n_classes, per = 4, 25
    seen = []

    def init(n, *, device=None, dtype=None, generator=None, y=None):
        seen.append(None if y is None else y.clone())
        base = torch.full((n, 2), -1.0) if y is None else y.double().view(-1, 1).expand(n, 2).float()
        return base.clone()

    buf = jem.ReplayBuffer(n_classes * per, (2,), n_classes=n_classes, init=init, reinit_freq=0.0)
    # the initial fill gives every block its class
    assert torch.equal(buf.buffer[:, 0], torch.arange(n_classes).repeat_interleave(per).float())
    y = torch.randint(0, n_classes, (300,))
    x0, idx = buf.sample(y=y)
    assert torch.equal(idx // per, y)
    assert torch.equal(x0[:, 0], y.float())
    # re-initialised chains come from their class's initial distribution
    buf.reinit_freq = 1.0
    buf.buffer.fill_(99.0)
    x0, idx = buf.sample(y=y)
    assert torch.equal(seen[-1], y) and torch.equal(x0[:, 0], y.float())


def test_buffer_update_last_duplicate_wins():
    buf = jem.ReplayBuffer(8, (2,), reinit_freq=0.0)
    before = buf.buffer.clone()
    idx = torch.tensor([3, 5, 3, 0, 3])
    samples = torch.arange(10, dtype=torch.float32).view(5, 2) + 10
    buf.update(idx, samples)
    assert torch.equal(buf.buffer[3], samples[4])
    assert torch.equal(buf.buffer[5], samples[1]) and torch.equal(buf.buffer[0], samples[3])
    untouched = [i for i in range(8) if i not in (0, 3, 5)]
    assert torch.equal(buf.buffer[untouched], before[untouched])


def test_buffer_reproducible_with_generator():
    a = jem.ReplayBuffer(100, (3,), generator=torch.Generator().manual_seed(5))
    b = jem.ReplayBuffer(100, (3,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.buffer, b.buffer)
    assert all(torch.equal(u, v) for u, v in zip(a.sample(50), b.sample(50)))


def test_class_gaussian_init_fits_each_class():
    torch.manual_seed(0)
    means = torch.tensor([[0.5, -0.5], [-0.3, 0.2]])
    x = torch.cat([means[0] + 0.1 * torch.randn(4000, 2), means[1] + 0.05 * torch.randn(4000, 2)])
    y = torch.arange(2).repeat_interleave(4000)
    init = jem.class_gaussian_init(x.view(-1, 1, 2), y, 2)
    s = init(20000, y=torch.ones(20000, dtype=torch.long))
    assert s.shape == (20000, 1, 2)
    assert torch.allclose(s.view(-1, 2).mean(0), means[1], atol=0.005)
    assert torch.allclose(s.view(-1, 2).std(0), torch.tensor([0.05, 0.05]), atol=0.005)
    buf = jem.ReplayBuffer(1000, (1, 2), n_classes=2, init=init)
    assert torch.allclose(buf.buffer[:500].view(-1, 2).mean(0), means[0], atol=0.02)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(size=0, sample_shape=(2,)), ValueError, "size"),
    (dict(size=10, sample_shape=(2,), n_classes=3), ValueError, "multiple of n_classes"),
    (dict(size=10, sample_shape=(2,), reinit_freq=1.5), ValueError, "reinit_freq"),
    (dict(size=10, sample_shape=(0,)), ValueError, "sample_shape"),
    (dict(size=10, sample_shape=(2,), init="gaussian"), ValueError, "init"),
    (dict(size=10, sample_shape=(2,), init=lambda n, **k: torch.zeros(n, 3)), ValueError, "init must return"),
])
def test_buffer_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        jem.ReplayBuffer(**kwargs)


def test_buffer_bad_calls():
    buf = jem.ReplayBuffer(10, (2,))
    with pytest.raises(ValueError, match="class-conditional"):
        buf.sample(y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="samples must have shape"):
        buf.update(torch.tensor([1, 2]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="idx"):
        buf.update(torch.tensor([1.0]), torch.zeros(1, 2))


# ---------------------------------------------------------------- SGLDSampler


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.lin(x.flatten(1))


def test_sampler_eval_mode_grad_wrt_x_only_and_write_back():
    model = ModeRecorder()
    model.train()
    buf = jem.ReplayBuffer(50, (6,), reinit_freq=0.0)
    sampler = jem.SGLDSampler(model, buf, n_steps=5)
    before = buf.buffer.clone()
    torch.manual_seed(0)
    out = sampler.sample(8)
    assert model.modes == [False] * 5 and model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not out.requires_grad and out.shape == (8, 6)
    # the final samples are written back at the drawn indices (and nowhere else)
    changed = (buf.buffer != before).any(1).nonzero().flatten()
    assert 1 <= changed.numel() <= 8
    assert all(any(torch.equal(buf.buffer[i], out[k]) for k in range(8)) for i in changed.tolist())


def test_sampler_matches_manual_chain():
    """The sampler's chain equals the explicit loop with sgld_step_ under the same seed."""
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    sampler = jem.SGLDSampler(model, None, n_steps=7, variant="sada-jem")
    torch.manual_seed(1)
    out = sampler.run_chain(x0)
    torch.manual_seed(1)
    x = x0.clone().requires_grad_(True)
    for _ in range(7):
        g, = torch.autograd.grad(model(x).logsumexp(1).sum(), [x])
        slf.sgld_step_(x, g, **{k: v for k, v in slf.SGLD_VARIANTS["sada-jem"].items()})
    assert torch.equal(out, x.detach())
    assert out.abs().max() <= 1.0


def test_sampler_reference_backend_same_chain_given_noise_free():
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    a = jem.SGLDSampler(model, None, n_steps=5, noise_std=0.0).run_chain(x0)
    b = jem.SGLDSampler(model, None, n_steps=5, noise_std=0.0, backend="reference").run_chain(x0)
    assert torch.equal(a, b)


class QuadraticLogits(nn.Module):
    """logits_k(x) = -|x - mu_k|^2 / (2 s^2): p(x | y = k) = N(mu_k, s^2 I)."""

    def __init__(self, mus, s):
        super().__init__()
        self.register_buffer("mus", mus)
        self.s = s

    def forward(self, x):
        return -((x[:, None, :] - self.mus[None]) ** 2).sum(2) / (2 * self.s ** 2)


def test_sampler_class_conditional_gaussian_moments():
    """Class-conditional chains (energy f(x)[y], per-class buffer blocks) reach N(mu_y, s^2)
    (up to the Langevin discretisation: variance s^2 / (1 - alpha / (4 s^2)))."""
    torch.manual_seed(0)
    mus = torch.tensor([[1.0, -1.0, 0.0], [-0.5, 0.5, 2.0]])
    s, alpha = 0.5, 0.02
    model = QuadraticLogits(mus, s)
    buf = jem.ReplayBuffer(4000, (3,), n_classes=2, reinit_freq=0.0)
    sampler = jem.SGLDSampler(model, buf, n_steps=150, variant="langevin", step_size=alpha)
    y = torch.arange(2).repeat_interleave(2000)
    out = sampler.sample(y=y)
    v = s * s / (1 - alpha / (4 * s * s))
    for k in range(2):
        z = out[y == k].double()
        n = z.shape[0]
        assert ((z.mean(0) - mus[k].double()).abs() < 5 * math.sqrt(v / n)).all()
        assert ((z.var(0) / v - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_sampler_short_run_and_bad_input():
    model = SmallCNN(width=4)
    sampler = jem.SGLDSampler(model, None, n_steps=2, sample_shape=(1, 8, 8))
    assert sampler.sample(5).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="sample_shape"):
        jem.SGLDSampler(model, None, n_steps=2).sample(5)
    with pytest.raises(ValueError, match="variant"):
        jem.SGLDSampler(model, None, variant="mcmc")
    with pytest.raises(ValueError, match="n_steps"):
        jem.SGLDSampler(model, None, n_steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        jem.SGLDSampler(model, None, step_size=-1.0)
    with pytest.raises(ValueError, match="grad_clamp"):
        jem.SGLDSampler(model, None, grad_clamp=(1, -1))


# ---------------------------------------------------------------- jem_loss


def test_jem_loss_terms():
    torch.manual_seed(0)
    ld, ls, lsy = torch.randn(8, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.randn(
        4, 5, dtype=torch.float64)
    y, ys = torch.randint(0, 5, (8,)), torch.randint(0, 5, (4,))
    lse = lambda t: torch.log(torch.exp(t).sum(1))  # noqa: E731
    expected = (-lse(ld).mean() + lse(ls).mean()) * 1.0 + F.nll_loss(torch.log_softmax(ld, 1), y) * 0.5
    expected = expected + 0.3 * (-ld[torch.arange(8), y].mean() + lsy[torch.arange(4), ys].mean())
    expected = expected + 0.1 * (lse(ld).pow(2).mean() + lse(ls).pow(2).mean())
    loss, parts = jem.jem_loss(ld, ls, y, logits_samples_y=lsy, y_samples=ys, p_y_given_x_weight=0.5,
                               p_x_y_weight=0.3, energy_l2=0.1, return_parts=True)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)
    assert set(parts) >= {"l_p_x", "l_p_y_given_x", "l_p_x_y", "energy_l2", "lse_data", "lse_samples"}
    # defaults: p(x) + p(y|x)
    base = jem.jem_loss(ld, ls, y)
    assert torch.allclose(base, -lse(ld).mean() + lse(ls).mean() + F.cross_entropy(ld, y), rtol=1e-12)
    # separate labeled batch
    ll = torch.randn(3, 5, dtype=torch.float64)
    yl = torch.randint(0, 5, (3,))
    sep = jem.jem_loss(ld, ls, yl, logits_labeled=ll)
    assert torch.allclose(sep, -lse(ld).mean() + lse(ls).mean() + F.cross_entropy(ll, yl), rtol=1e-12)


def test_jem_loss_bad_input():
    ld, ls = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        jem.jem_loss(ld, ls)
    with pytest.raises(ValueError, match="labels"):
        jem.jem_loss(ld, ls, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="logits_samples"):
        jem.jem_loss(ld, None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        jem.jem_loss(ld, torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="energy_l2"):
        jem.jem_loss(ld, ls, torch.zeros(4, dtype=torch.long), energy_l2=-1.0)
    with pytest.raises(ValueError, match="y_samples"):
        jem.jem_loss(ld, ls, torch.zeros(4, dtype=torch.long), p_x_y_weight=1.0)


# ---------------------------------------------------------------- JEMTrainer


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (torch.randn(n, 1, 8, 8, generator=g) * 0.3 + (y.view(-1, 1, 1, 1).float() - 1) * 0.5).clamp(-1, 1)
    return x, y


def test_trainer_runs_and_records():
    torch.manual_seed(0)
    model = SmallCNN(n_classes=3, width=4)
    trainer = jem.JEMTrainer(model, n_classes=3, sample_shape=(1, 8, 8), buffer_size=300, n_steps=3, lr=1e-3,
                             progress=False, generator=torch.Generator().manual_seed(0), warmup_iters=4)
    before = trainer.buffer.buffer.clone()
    w0 = [p.detach().clone() for p in model.parameters()]
    hist = trainer.fit(tiny_data(), epochs=2, batch_size=32)
    assert len(hist) == 6 and trainer.iteration == 6
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert {"loss", "acc", "l_p_x", "l_p_y_given_x", "lse_data", "lse_samples"} <= set(hist[0])
    assert not torch.equal(before, trainer.buffer.buffer)
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # warm-up finished


def test_trainer_class_conditional_and_pxy():
    torch.manual_seed(0)
    model = SmallCNN(n_classes=3, width=4)
    trainer = jem.JEMTrainer(model, n_classes=3, sample_shape=(1, 8, 8), buffer_size=300, n_steps=2,
                             p_x_y_weight=1.0, class_cond_samples=True, energy_l2=0.1, progress=False)
    assert trainer.buffer.n_classes == 3
    stats = trainer.step(*tiny_data(32))
    assert {"l_p_x_y", "energy_l2"} <= set(stats)


def test_trainer_divergence_stops_with_a_clear_message():
    torch.manual_seed(0)
    model = SmallCNN(n_classes=3, width=4)
    trainer = jem.JEMTrainer(model, n_classes=3, sample_shape=(1, 8, 8), buffer_size=300, n_steps=1,
                             divergence_threshold=1e-6, progress=False)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(jem.JEMDivergenceError, match=r"diverged at iteration 0.*lower learning rate.*energy_l2"):
        trainer.fit(tiny_data(), epochs=1, batch_size=32)
    # stopped before the optimizer step: the weights are the last good ones
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    # a non-finite loss is divergence too
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    trainer.divergence_threshold = 1e8
    with pytest.raises(jem.JEMDivergenceError, match="loss=nan"):
        trainer.step(*tiny_data(32))


def test_trainer_bad_input():
    model = SmallCNN(n_classes=3, width=4)
    trainer = jem.JEMTrainer(model, n_classes=3, sample_shape=(1, 8, 8), buffer_size=300, progress=False)
    with pytest.raises(ValueError, match="shape"):
        trainer.step(torch.zeros(4, 1, 7, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="y"):
        trainer.step(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="data_noise"):
        jem.JEMTrainer(model, n_classes=3, sample_shape=(1, 8, 8), buffer_size=300, data_noise=-1.0)


# ---------------------------------------------------------------- evaluation


def test_ece_hand_computed():
    # confidences 0.9 (correct), 0.8 (wrong), 0.625 (correct), 0.625 (wrong), 0.75 (correct)
    # float64: 0.9 and 0.8 are not exact in float32 (float32 0.8 is above 0.8: the next bin)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.625, 0.375], [0.375, 0.625], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 1])
    # bins of 1/20: 0.9 -> (0.85, 0.9]; 0.8 -> (0.75, 0.8]; 0.625 x2 -> (0.6, 0.65] with one
    # correct; 0.75 -> (0.7, 0.75] (right-closed)
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + 2 * abs(0.5 - 0.625) + abs(1 - 0.75)) / 5
    ece = jem_eval.expected_calibration_error(probs, labels, n_bins=20)
    assert abs(ece.item() - expected) < 1e-15
    bins = jem_eval.calibration_bins(probs, labels, 20)
    assert bins["count"][14].item() == 1 and bins["count"][12].item() == 2
    # 10 bins: 0.75 -> (0.7, 0.8] with 0.8
    e10 = jem_eval.expected_calibration_error(probs, labels, n_bins=10)
    assert abs(e10.item() - (abs(1 - 0.9) + 2 * abs(0.5 - 0.775) + 2 * abs(0.5 - 0.625)) / 5) < 1e-15


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ece_non_finite_probabilities_raise_a_named_error(bad):
    probs = torch.softmax(torch.randn(5, 3), 1)
    probs[3, 1] = bad
    with pytest.raises(ValueError, match="probs must be finite .* first in row 3"):
        jem_eval.expected_calibration_error(probs, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="probs must be finite"):
        jem_eval.reliability_diagram(probs, torch.tensor([0, 1, 2, 0, 1]))


def test_ece_matches_loop_definition():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1000, 7) * 2, 1)
    labels = torch.randint(0, 7, (1000,))
    conf, pred = probs.max(1)
    ece = 0.0
    for m in range(20):
        lo, hi = m / 20, (m + 1) / 20
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.sum().item() / 1000 * abs((pred[sel] == labels[sel]).double().mean().item()
                                                 - conf[sel].double().mean().item())
    assert abs(jem_eval.expected_calibration_error(probs, labels).item() - ece) < 1e-12


def test_reliability_diagram_png(tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(200, 4), 1)
    labels = torch.randint(0, 4, (200,))
    path = tmp_path / "rel.png"
    ece = jem_eval.reliability_diagram(probs, labels, str(path), title="test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ece == pytest.approx(jem_eval.expected_calibration_error(probs, labels).item())


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    pos = torch.randn(300).round(decimals=1) + 0.5  # ties within and across the two sets
    neg = torch.randn(200).round(decimals=1)
    expected = metrics.roc_auc_score([1] * 300 + [0] * 200, torch.cat([pos, neg]).numpy())
    assert abs(jem_eval.auroc(pos, neg).item() - expected) < 1e-12
    assert jem_eval.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    assert jem_eval.auroc(torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.5


def test_ood_scores():
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    logits = model(x).detach()
    assert torch.allclose(jem_eval.ood_scores(model, x, "lse", batch_size=3), logits.logsumexp(1))
    assert torch.allclose(jem_eval.ood_scores(model, x, "max_softmax"), logits.softmax(1).max(1).values)
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(model(xr).logsumexp(1).sum(), [xr])
    assert torch.allclose(jem_eval.ood_scores(model, x, "grad_norm", batch_size=4), -g.flatten(1).norm(dim=1))
    res = jem_eval.ood_auroc(model, x, x + 5.0)
    assert set(res) == {"lse", "max_softmax", "grad_norm"} and all(0 <= v <= 1 for v in res.values())
    with pytest.raises(ValueError, match="score"):
        jem_eval.ood_scores(model, x, "energy")


def linear_binary(w, b):
    lin = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        lin.bias.copy_(torch.tensor([0.0, b]))
    return nn.Sequential(nn.Flatten(), lin).double()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_the_closed_form_on_a_linear_model(norm):
    """For logits (0, w.x + b) the worst case within eps moves the margin by eps ||w||_1 (L-inf)
    or eps ||w||_2 (L2): a point stays correct iff |w.x + b| > that. PGD (unbounded inputs)
    finds exactly those points (L2 from x itself: from a random start, the radial projection
    only slowly removes the start's component orthogonal to w)."""
    torch.manual_seed(0)
    w = torch.randn(12, dtype=torch.float64)
    b = 0.1
    model = linear_binary(w, b)
    x = torch.randn(400, 12, dtype=torch.float64)
    margin = x @ w + b
    y = (margin > 0).long()
    eps = 0.08 if norm == "linf" else 0.3
    budget = eps * (w.abs().sum() if norm == "linf" else w.norm())
    keep = (margin.abs() - budget).abs() > 1e-6  # leave out points on the boundary of the answer
    x, y, margin = x[keep], y[keep], margin[keep]
    expected = (margin.abs() > budget).double().mean().item()
    got = jem_eval.robust_accuracy(model, x, y, norm=norm, eps=eps, n_iter=20, clamp=None,
                                   random_start=norm == "linf", generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, abs=1e-12)
    x_adv = jem_eval.pgd_attack(model, x, y, norm=norm, eps=eps, n_iter=20, clamp=None)
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-12).all()
    assert jem_eval.robust_accuracy(model, x, y, norm=norm, eps=0.0, n_iter=3, clamp=None) == pytest.approx(1.0)


def test_pgd_respects_the_input_range_and_sgld_refinement_runs():
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    x = torch.rand(12, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 10, (12,))
    x_adv = jem_eval.pgd_attack(model, x, y, eps=0.3, n_iter=5)
    assert x_adv.min() >= -1 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= 0.3 + 1e-6
    acc = jem_eval.robust_accuracy(model, x, y, eps=0.1, n_iter=3, sgld_steps=2, sgld=dict(step_size=1.0, noise_std=0.01))
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="norm"):
        jem_eval.pgd_attack(model, x, y, norm="l1", eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        jem_eval.pgd_attack(model, x, y, eps=-0.1)


# ---------------------------------------------------------------- the digits example


def test_digits_example_short_config(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "jem_digits.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for words in ("accuracy", "ECE", "AUROC", "PGD", "diverged"):
        assert words in out, out
    for name in ("reliability.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000

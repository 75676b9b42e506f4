"""Adversarial training and transfer: pgd_attack's radii lists and per-example radii (each the
single-radius attack, no host read-back in the loop), the PGD and TRADES losses against the
papers' loops (the reference) given the same start, their gradients, options and bad input; the
fixed-feature / full-network transfer helper; the digits example's quick mode and the docs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structloss_fast as slf
from structloss_fast.adversarial import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one thread (a shared 2-core machine makes the thread pool's
    waits cost seconds per test on matrices of a few hundred rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
NORMS = ["linf", "l2"]
RADIUS = {"linf": 0.1, "l2": 0.5}


def model_and_batch(n=12, dtype=torch.float64, seed=0, classes=5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, classes)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    start = (x + 0.05 * (torch.rand(x.shape, generator=g, dtype=dtype) * 2 - 1)).clamp(0, 1)
    return model, x, y, start


def per_example_norm(t, norm):
    flat = t.flatten(1)
    return flat.abs().max(1).values if norm == "linf" else flat.norm(dim=1)


# ---------------------------------------------------------------- pgd_attack extensions


@pytest.mark.parametrize("norm", NORMS)
def test_radius_list_is_one_attack_per_radius(norm):
    model, x, y, start = model_and_batch()
    radii = [0.0, RADIUS[norm], 2 * RADIUS[norm]]
    kw = dict(norm=norm, n_iter=7, clamp=(0.0, 1.0), x_init=start)
    batched = slf.pgd_attack(model, x, y, eps=radii, **kw)
    assert batched.shape == (3, *x.shape)
    for e, r in enumerate(radii):
        single = slf.pgd_attack(model, x, y, eps=r, **kw)
        torch.testing.assert_close(batched[e], single, rtol=0, atol=1e-12)
        assert (per_example_norm(batched[e] - x, norm) <= r + 1e-9).all()
    assert torch.equal(batched[0], x)  # radius 0: the input itself


@pytest.mark.parametrize("norm", NORMS)
def test_per_example_radii(norm):
    model, x, y, _ = model_and_batch()
    radii = torch.linspace(0, 2 * RADIUS[norm], x.shape[0], dtype=x.dtype)
    g = torch.Generator().manual_seed(5)
    adv = slf.pgd_attack(model, x, y, norm=norm, eps=radii, n_iter=5, clamp=None, generator=g)
    assert (per_example_norm(adv - x, norm) <= radii + 1e-9).all()
    assert torch.equal(adv[0], x[0])
    # example n attacked alone in its own ball (no random start: deterministic)
    adv = slf.pgd_attack(model, x, y, norm=norm, eps=radii, n_iter=5, clamp=None, random_start=False)
    for n in (3, 11):
        alone = slf.pgd_attack(model, x[n:n + 1], y[n:n + 1], norm=norm, eps=float(radii[n]), n_iter=5, clamp=None,
                               random_start=False)
        torch.testing.assert_close(adv[n:n + 1], alone, rtol=0, atol=1e-12)


def test_float_radius_call_unchanged_by_the_list_form():
    model, x, y, _ = model_and_batch(dtype=torch.float32)
    a = slf.pgd_attack(model, x, y, eps=0.1, n_iter=5, generator=torch.Generator().manual_seed(0))
    b = slf.pgd_attack(model, x, y, eps=[0.1], n_iter=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b[0], a, rtol=0, atol=1e-6)


def test_attack_matches_the_reference_loop():
    for norm in NORMS:
        model, x, y, start = model_and_batch()
        ours = slf.pgd_attack(model, x, y, norm=norm, eps=RADIUS[norm], n_iter=6, clamp=(0.0, 1.0), x_init=start)
        theirs = ref.pgd(model, x, y, norm=norm, eps=RADIUS[norm], n_iter=6, clamp=(0.0, 1.0), x_start=start)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_attack_loop_reads_nothing_back_to_the_host(monkeypatch):
    """No .item(), bool(tensor), float(tensor), .tolist() anywhere in the attack (radius, list
    of radii, TRADES objective)."""
    model, x, y, _ = model_and_batch(dtype=torch.float32)
    calls = []

    def forbid(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host read-back: Tensor.{name}")
        return method

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    slf.pgd_attack(model, x, y, eps=0.1, n_iter=3)
    slf.pgd_attack(model, x, y, norm="l2", eps=[0.1, 0.3], n_iter=3)
    slf.trades_loss(model, x, y, eps=[0.1, 0.2], n_iter=3)
    slf.pgd_adversarial_loss(model, x, y, eps=0.1, n_iter=3, norm="l2")
    assert calls == []


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(eps=[]), ValueError, "eps must hold at least one radius"),
    (dict(eps=[0.1, -0.2]), ValueError, r"eps\[1\] must be >= 0"),
    (dict(eps=torch.ones(3)), ValueError, "eps must have one entry per row of x"),
    (dict(eps=torch.full((12,), -1.0)), ValueError, "eps must hold finite radii >= 0"),
    (dict(eps=0.1, objective=3), TypeError, "objective must be callable"),
    (dict(eps=0.1, x_init=torch.zeros(2)), ValueError, "x_init must have the shape of x"),
    (dict(eps=0.1, step_size=-1.0), ValueError, "step_size must be >= 0"),
])
def test_pgd_attack_bad_input(kwargs, exc, words):
    model, x, y, _ = model_and_batch()
    with pytest.raises(exc, match=words):
        slf.pgd_attack(model, x, y, **kwargs)


# ---------------------------------------------------------------- the losses against the papers' loops


def grads_of(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_pgd_loss_matches_reference(norm, clean_weight):
    model, x, y, start = model_and_batch()
    kw = dict(norm=norm, eps=RADIUS[norm], n_iter=6, clamp=(0.0, 1.0), clean_weight=clean_weight)
    ours = slf.pgd_adversarial_loss(model, x, y, x_init=start, **kw)
    theirs = ref.pgd_adversarial_loss(model, x, y, x_start=start, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(grads_of(model, ours), grads_of(model, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert model.training  # the caller's mode is restored


@pytest.mark.parametrize("norm", NORMS)
def test_trades_matches_the_authors_loop(norm):
    model, x, y, start = model_and_batch()
    kw = dict(norm=norm, eps=RADIUS[norm], n_iter=6, clamp=(0.0, 1.0), beta=3.0)
    ours = slf.trades_loss(model, x, y, x_init=start, **kw)
    theirs = ref.trades_loss(model, x, y, x_start=start, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_of(model, ours), grads_of(model, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_reductions_and_radii_lists():
    model, x, y, start = model_and_batch()
    for fn, extra in ((slf.pgd_adversarial_loss, {}), (slf.trades_loss, dict(beta=2.0))):
        kw = dict(eps=0.1, n_iter=4, clamp=(0.0, 1.0), x_init=start, **extra)
        none = fn(model, x, y, reduction="none", **kw)
        assert none.shape == (12,)
        torch.testing.assert_close(fn(model, x, y, reduction="sum", **kw), none.sum())
        torch.testing.assert_close(fn(model, x, y, **kw), none.mean())
        # a list of radii: each example's term averaged over the radii
        kw.pop("eps")
        both = fn(model, x, y, eps=[0.05, 0.2], reduction="none", **kw)
        each = [fn(model, x, y, eps=e, reduction="none", **kw) for e in (0.05, 0.2)]
        torch.testing.assert_close(both, (each[0] + each[1]) / 2)


def test_return_adversarial_and_empty_batch():
    model, x, y, start = model_and_batch()
    loss, adv = slf.pgd_adversarial_loss(model, x, y, eps=[0.1, 0.2], n_iter=2, return_adversarial=True)
    assert adv.shape == (2, *x.shape) and loss.dim() == 0
    loss, adv = slf.trades_loss(model, x, y, eps=0.1, n_iter=2, return_adversarial=True)
    assert adv.shape == x.shape
    e = slf.pgd_adversarial_loss(model, x[:0], y[:0], eps=0.1, n_iter=2)
    assert e.item() == 0.0 and slf.trades_loss(model, x[:0], y[:0], eps=0.1, n_iter=2, reduction="none").shape == (0,)


def test_trades_start_options():
    model, x, y, _ = model_and_batch()
    # at x' = x the KL is at its minimum: its gradient is zero up to rounding (hence a start off x)
    from structloss_fast.adversarial.losses import _kl_objective

    xr = x.clone().requires_grad_(True)
    with torch.no_grad():
        target = F.log_softmax(model(x), dim=1)
    g, = torch.autograd.grad(_kl_objective(model(xr), target), [xr])
    assert g.abs().max() < 1e-12
    _, adv = slf.trades_loss(model, x, y, eps=0.1, n_iter=0, random_start=False, return_adversarial=True)
    assert torch.equal(adv, x)
    runs = [slf.trades_loss(model, x, y, eps=0.1, n_iter=3, random_start="gaussian", return_adversarial=True,
                            generator=torch.Generator().manual_seed(4))[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], x)


def test_robust_training_raises_robust_accuracy():
    """Tsipras et al.'s toy task: one robust feature (the sign of the label, flipped with
    probability 0.1) and 30 weakly correlated features N(0.3 y, 1) that an L-inf attack of 0.5
    flips together. Standard training leans on the weak features; PGD and TRADES training keep
    their accuracy under the attack (the losses do what they are for)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, d = 400, 30
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    robust = sign * torch.where(torch.rand(n, generator=g) < 0.9, 1, -1)
    x = torch.cat([robust[:, None].float(), 0.3 * sign[:, None] + torch.randn(n, d, generator=g)], 1)
    y = (sign > 0).long()
    results = {}
    for kind in ("standard", "pgd", "trades"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(d + 1, 32), nn.ReLU(), nn.Linear(32, 2))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for _ in range(60):
            if kind == "standard":
                loss = F.cross_entropy(model(x), y)
            elif kind == "pgd":
                loss = slf.pgd_adversarial_loss(model, x, y, eps=0.5, n_iter=5, clamp=None, generator=g)
            else:
                loss = slf.trades_loss(model, x, y, eps=0.5, n_iter=5, clamp=None, generator=g, beta=6.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        adv = slf.pgd_attack(model, x, y, eps=0.5, n_iter=20, clamp=None, generator=g)
        with torch.no_grad():
            results[kind] = (model(adv).argmax(1) == y).double().mean().item()
    assert results["standard"] < 0.5 and results["pgd"] > 0.8 and results["trades"] > 0.8, results


def test_module_forms():
    model, x, y, _ = model_and_batch()
    mod = slf.PGDAdversarialLoss(eps=0.1, n_iter=3, clamp=(0.0, 1.0), clean_weight=0.25,
                                 generator=torch.Generator().manual_seed(0))
    expected = slf.pgd_adversarial_loss(model, x, y, eps=0.1, n_iter=3, clamp=(0.0, 1.0), clean_weight=0.25,
                                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mod(model, x, y), expected, rtol=0, atol=0)
    assert "eps=0.1" in repr(mod)
    tr = slf.TRADESLoss(eps=0.1, beta=1.0, n_iter=2, random_start="gaussian",
                        generator=torch.Generator().manual_seed(0))
    expected = slf.trades_loss(model, x, y, eps=0.1, beta=1.0, n_iter=2, random_start="gaussian",
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tr(model, x, y), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [slf.pgd_adversarial_loss, slf.trades_loss])
@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(eps=0.1, norm="l1"), ValueError, "norm must be 'linf' or 'l2'"),
    (dict(eps=-0.1), ValueError, "eps must be >= 0"),
    (dict(eps=0.1, reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(eps=0.1, n_iter=-1), ValueError, "n_iter must be a non-negative int"),
])
def test_loss_bad_input(fn, kwargs, exc, words):
    model, x, y, _ = model_and_batch()
    with pytest.raises(exc, match=words):
        fn(model, x, y, **kwargs)


def test_loss_specific_bad_input():
    model, x, y, _ = model_and_batch()
    with pytest.raises(ValueError, match="clean_weight must be <= 1"):
        slf.pgd_adversarial_loss(model, x, y, eps=0.1, clean_weight=2.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        slf.trades_loss(model, x, y, eps=0.1, beta=-1.0)
    with pytest.raises(ValueError, match="random_start must be True, False or 'gaussian'"):
        slf.trades_loss(model, x, y, eps=0.1, random_start="uniform")
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        slf.pgd_adversarial_loss(model, x, y.double(), eps=0.1)
    with pytest.raises(ValueError, match="y must have one entry per row of x"):
        slf.trades_loss(model, x, y[:3], eps=0.1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        slf.pgd_adversarial_loss(lambda t: t, x, y, eps=0.1)


# ---------------------------------------------------------------- transfer


def transfer_setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    source = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return source, (x[:80], y[:80]), (x[80:], y[80:])


def test_transfer_fixed_feature_and_full_network():
    source, train, test = transfer_setup()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    res = slf.transfer(source, train, test, n_classes=3, epochs=30, lr=1e-2, progress=False,
                       generator=torch.Generator().manual_seed(0))
    assert set(res) == set(slf.TRANSFER_MODES)
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k])  # the source is not modified
    fixed, full = res["fixed-feature"], res["full-network"]
    assert 0.0 <= fixed.accuracy <= 1.0 and 0.0 <= full.accuracy <= 1.0
    # fixed-feature: the features are the source's, only the head changed
    for name in ("0.weight", "2.weight"):
        assert torch.equal(fixed.model.state_dict()[name], before[name])
        assert not torch.equal(full.model.state_dict()[name], before[name])
    assert full.accuracy > 0.6 and len(fixed.history) == 30
    # the reported accuracy is the returned model's
    with torch.no_grad():
        acc = (fixed.model(test[0]).argmax(1) == test[1]).double().mean().item()
    assert acc == pytest.approx(fixed.accuracy)


def test_transfer_head_choice_and_bad_input():
    source, train, test = transfer_setup()
    assert slf.adversarial.find_head(source)[0] == "4"
    res = slf.transfer(source, train, test, n_classes=5, modes="full-network", head="4", epochs=1, progress=False)
    assert res["full-network"].model[4].out_features == 5
    with pytest.raises(TypeError, match="head '1' must be an nn.Linear"):
        slf.transfer(source, train, test, n_classes=2, head="1", epochs=1)
    with pytest.raises(ValueError, match="modes must be taken from"):
        slf.transfer(source, train, test, n_classes=2, modes=("linear-probe",), epochs=1)
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        slf.transfer(source, train, test, n_classes=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        slf.transfer(nn.Sequential(nn.ReLU()), train, test, n_classes=2)

# ---------------------------------------------------------------- example and docs


def test_transfer_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "adversarial_transfer_digits.py"), "--quick",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for words in ("standard", "fixed-feature", "full-network", "+-"):
        assert words in proc.stdout, proc.stdout
    assert (tmp_path / "adversarial_transfer_digits.png").stat().st_size > 1000

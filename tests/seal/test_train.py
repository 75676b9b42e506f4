"""SEAL family: data generators, metrics (against scikit-learn), the trainers on short runs, and
the example in a short configuration."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import structloss_fast as slf
from structloss_fast.seal import data as D
from structloss_fast.seal import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_block_task_has_one_label_per_block_from_the_argmax():
    data = D.make_block_task(50, 20, 30, seed=3)
    x, y = data["train"]
    assert x.shape == (50, 64) and y.shape == (50, 16)
    assert data["val"][0].shape == (20, 64) and data["test"][0].shape == (30, 64)
    assert torch.equal(y.view(50, 4, 4).sum(2), torch.ones(50, 4))
    again = D.make_block_task(50, 20, 30, seed=3)
    assert torch.equal(again["test"][1], data["test"][1])
    other = D.make_block_task(50, 20, 30, seed=4)
    assert not torch.equal(other["train"][1], y)
    # the labels are the block-wise argmax of one fixed linear map: a least-squares fit of the
    # map on the train split predicts the test labels
    A = torch.linalg.lstsq(x.double(), (y.double() - 0.25), rcond=None).solution
    assert A.shape == (64, 16)
    # a fresh draw with noise changes some labels, never the one-per-block structure
    noisy = D.make_block_task(200, 0, 0, noise=1.0, seed=3)["train"][1]
    assert torch.equal(noisy.view(200, 4, 4).sum(2), torch.ones(200, 4))
    with pytest.raises(ValueError, match="multiple of block_size"):
        D.make_block_task(10, 10, 10, n_labels=10, block_size=4)


def test_bibtex_like_shapes():
    data = D.make_bibtex_like(60, 20, 20, seed=1)
    x, y = data["train"]
    assert x.shape == (60, 1836) and y.shape == (60, 159)
    assert (y.sum(1) >= 1).all() and 1.0 < y.sum(1).float().mean() < 5.0
    assert (x >= 0).all()


def test_example_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 12, generator=g)
    targets = (torch.rand(200, 12, generator=g) < 0.3).float()
    targets[0] = 0
    scores[0] = 0.1  # nothing predicted, nothing gold: 1
    scores[1] = 0.1  # nothing predicted, something gold: 0
    targets[1, 3] = 1
    ours = D.example_f1(scores, targets)
    theirs = f1_score(targets.numpy(), (scores >= 0.5).numpy(), average="samples", zero_division=1)
    assert abs(ours - theirs) < 1e-12
    assert abs(D.example_f1(scores, targets, threshold=0.8)
               - f1_score(targets.numpy(), (scores >= 0.8).numpy(), average="samples", zero_division=1)) < 1e-12


def test_average_precision_matches_sklearn_with_ties():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (300, 9), generator=g).float() / 4  # many ties
    targets = (torch.rand(300, 9, generator=g) < 0.3).float()
    targets[:, 0] = 1  # every example has a gold label (sklearn's convention otherwise differs)
    ours = D.average_precision(scores, targets)
    theirs = average_precision_score(targets.numpy(), scores.numpy(), average="samples")
    assert abs(ours - theirs) < 1e-12
    perfect = D.average_precision(targets, targets)
    assert perfect == 1.0


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        D.example_f1(torch.rand(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError, match="one shape"):
        D.average_precision(torch.rand(3, 4), torch.rand(4, 4))


def _tiny_data():
    return D.make_block_task(64, 32, 32, seed=0)


CFG = T.TrainConfig(epochs=2, progress=False, patience=5)


def test_trainers_run_and_restore_the_best_epoch():
    torch.manual_seed(0)
    data = _tiny_data()
    net = T.TaskNet(64, 16, hidden=16)
    h = T.train_bce(net, data, CFG)
    assert len(h.val_f1) == 2 and h.best_val_f1 == max(h.val_f1)
    # the restored weights are the best epoch's: their validation F1 is the best
    f1 = D.example_f1(T.predict_probs(net, data["val"][0]), data["val"][1])
    assert abs(f1 - h.best_val_f1) < 1e-12
    assert not net.training

    energy = slf.EnergyNet(64, 16, hidden=16, global_hidden=8)
    before = energy.global_out.detach().clone()
    h = T.train_seal_dynamic(T.TaskNet(64, 16, hidden=16), energy, data, CFG, outer_rounds=2, loss_net_steps=2,
                             num_samples=5)
    assert len(h.val_f1) == 2 and not torch.equal(before, energy.global_out)

    energy = slf.EnergyNet(64, 16, hidden=16, global_hidden=8)
    net = T.TaskNet(64, 16, hidden=16)
    h = T.train_seal_static(net, energy, data, CFG, pretrain_epochs=1, task_steps=2, num_samples=5)
    frozen = energy.global_out.detach().clone()
    assert len(h.val_f1) == 2

    for loss in ("ranking", "regression"):
        T.train_seal_dynamic(T.TaskNet(64, 16, hidden=16), slf.EnergyNet(64, 16, hidden=16, global_hidden=8), data,
                             T.TrainConfig(epochs=1, progress=False), loss=loss, outer_rounds=1, loss_net_steps=1,
                             num_samples=4)
    with pytest.raises(ValueError, match="loss must be"):
        T.train_seal_dynamic(T.TaskNet(64, 16, hidden=16), slf.EnergyNet(64, 16, hidden=16, global_hidden=8), data,
                             T.TrainConfig(epochs=1, progress=False), loss="hinge", outer_rounds=1, loss_net_steps=1)
    assert torch.equal(frozen, energy.global_out)


def test_static_phase_two_keeps_the_loss_net_fixed():
    torch.manual_seed(1)
    data = _tiny_data()
    energy = slf.EnergyNet(64, 16, hidden=16, global_hidden=8)
    T.pretrain_loss_net(energy, data, CFG, epochs=1, num_samples=4)
    snapshot = {k: v.clone() for k, v in energy.state_dict().items()}
    energy.zero_grad(set_to_none=True)
    # train_seal_static would pre-train again; the task phase alone, through its frozen context:
    net = T.TaskNet(64, 16, hidden=16)
    with T._Frozen(energy):
        loss = slf.seal_task_loss(energy, data["train"][0][:8], net(data["train"][0][:8]), data["train"][1][:8])
        loss.backward()
    assert all(p.grad is None for p in energy.parameters())
    assert all(torch.equal(v, energy.state_dict()[k]) for k, v in snapshot.items())
    assert all(p.requires_grad for p in energy.parameters())


def test_spen_and_infnet_trainers_run():
    torch.manual_seed(2)
    data = _tiny_data()
    energy = slf.EnergyNet(64, 16, hidden=16, global_hidden=8)
    h = T.train_spen(energy, data, CFG, pretrain_epochs=1, gbi_steps=3)
    assert len(h.val_f1) == 2
    probs = T.spen_predict(energy, data["test"][0], steps=3)
    assert probs.shape == (32, 16) and ((probs > 0) & (probs < 1)).all()
    net = T.TaskNet(64, 16, hidden=16)
    h = T.train_infnet(net, slf.EnergyNet(64, 16, hidden=16, global_hidden=8), slf.CostAugmentedNet(16, hidden=8),
                       data, CFG)
    assert len(h.val_f1) == 2
    res = T.evaluate(T.predict_probs(net, data["test"][0]), data["test"][1])
    assert 0 <= res["example_f1"] <= 1 and 0 < res["map"] <= 1


def test_latency_per_example():
    net = T.TaskNet(64, 16, hidden=16)
    x = torch.randn(20, 64)
    t = T.latency_per_example(lambda v: T.predict_probs(net, v), x, batch_size=4, repeats=1)
    assert 0 < t < 1


def test_example_runs_in_a_short_configuration():
    """The example end to end (all four methods, 2 seeds, tiny sizes): it prints its table."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "seal_block_task.py"), "--quick"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for name in ("BCE", "SEAL-static NCE", "SEAL-dynamic NCE", "SPEN (GBI)"):
        assert name in text
    assert "example-F1" in text and "latency" in text

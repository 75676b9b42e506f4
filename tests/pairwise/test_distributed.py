"""Two processes on the gloo backend: the distributed loss equals the single-process loss on the
concatenated batch, and DDP-averaged parameter gradients equal the single-process gradients."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import structloss_fast as slf

pytestmark = pytest.mark.distributed

LOSSES = {
    "circle": lambda: slf.CircleLoss(),
    "unified": lambda: slf.UnifiedLoss(),
    "multi_similarity": lambda: slf.MultiSimilarityLoss(),
    "supcon": lambda: slf.SupConLoss(),
    "ntxent": lambda: slf.NTXentLoss(),
    "contrastive": lambda: slf.ContrastiveLoss(),
    "triplet_all": lambda: slf.TripletMarginLoss(margin=0.2),
    "triplet_hard": lambda: slf.TripletMarginLoss(margin=0.2, mining="batch_hard"),
    "circle_sum": lambda: slf.CircleLoss(reduction="sum"),
}


def make_problem(split):
    gen = torch.Generator().manual_seed(0)
    n = sum(split)
    x = torch.randn(n, 10, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 6, (n,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=gen) * 0.5)
    return x, y, model


def _worker(rank, world, init_file, out_dir, split):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y, model = make_problem(split)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    results = {}
    for name, make in LOSSES.items():
        ddp.zero_grad()
        loss = slf.DistributedPairwiseLoss(make())(ddp(x[lo:hi]), y[lo:hi])
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("split", [(8, 8), (5, 11)], ids=["equal", "unequal"])
def test_two_process_gloo_matches_single_process(tmp_path, split):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), split), nprocs=world, join=True)
    x, y, model = make_problem(split)
    for name, make in LOSSES.items():
        model.zero_grad()
        expected = make()(model(x), y)
        expected.backward()
        expected_grads = [p.grad.clone() for p in model.parameters()]
        for rank in range(world):
            loss, grads = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item())), (name, rank)
            for g, e in zip(grads, expected_grads):
                assert torch.allclose(g, e, rtol=1e-8, atol=1e-12), (name, rank, (g - e).abs().max().item())


def test_without_process_group_is_the_plain_loss():
    x = torch.randn(12, 6)
    y = torch.arange(12) % 4
    wrapped = slf.DistributedPairwiseLoss(slf.SupConLoss())
    assert torch.equal(wrapped(x, y), slf.SupConLoss()(x, y))
    with pytest.raises(TypeError, match="pairwise loss module"):
        slf.DistributedPairwiseLoss(torch.nn.MSELoss())

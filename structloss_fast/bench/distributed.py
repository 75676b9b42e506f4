"""One training step of a pairwise loss across processes (gloo, CPU): time and per-rank peak memory.

    python -m structloss_fast.bench.distributed [--world 2] [--batch 4096] [--dim 128] [--loss supcon]

Each rank holds `batch` rows; the loss of its anchors runs against the all-gathered global batch
(world x batch references) with structloss_fast.DistributedPairwiseLoss under DDP. Peak memory is
each rank's peak RSS above its RSS once model and data exist (the B x B matrix of the global
batch would be (world * batch)^2 * 4 bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import structloss_fast as slf

LOSSES = {
    "circle": slf.CircleLoss, "supcon": slf.SupConLoss, "ntxent": slf.NTXentLoss,
    "multi_similarity": slf.MultiSimilarityLoss, "contrastive": slf.ContrastiveLoss,
    "triplet": slf.TripletMarginLoss,
}


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(rank, args, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.world))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=gen)
    y = torch.randint(0, max(args.batch * args.world // 4, 1), (args.batch,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Linear(args.dim, args.dim)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = slf.DistributedPairwiseLoss(LOSSES[args.loss]())
    result = {}
    for step in range(args.steps + 1):  # the first step warms up (threads, allocator, gloo buffers)
        dist.barrier()
        if step == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = rss("VmRSS")
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step >= 1:
            result.setdefault("times", []).append(dt)
    result.update(peak_bytes=rss("VmHWM") - base, loss=loss.item(), rank=rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096, help="rows per rank")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--loss", choices=sorted(LOSSES), default="supcon")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "init"), tmp), nprocs=args.world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
    total = args.world * args.batch
    dense = total * total * 4
    print(f"{args.loss}: {args.world} ranks x {args.batch} rows, D={args.dim}, gloo, torch {torch.__version__}")
    for r in ranks:
        print(f"  rank {r['rank']}: step {min(r['times']):.2f} s (best of {len(r['times'])}), "
              f"peak memory +{r['peak_bytes'] / 2**20:.1f} MB, loss {r['loss']:.4f}")
    print(f"  global batch {total} x {total}: a dense similarity matrix alone would be {dense / 2**20:.0f} MB")
    return ranks


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Train a small embedding network on scikit-learn's digits with every pairwise loss of
structloss_fast, alone and in pytorch-metric-learning's mined form (a miner's tuple, reducers,
a cross-batch memory with a miner, two augmented views without labels), and report Recall@1 on
held-out digits.

    python examples/pairwise_digits.py [--epochs 30] [--batch 128] [--seed 0]

The digits (8x8 images, 10 classes) are split into train and held-out test images; each loss
trains the same MLP (64 -> 128 -> 32, L2-normalized embeddings) from the same initialization.
Recall@1: the fraction of held-out images whose nearest other held-out image (cosine similarity)
has the same label. About 1.5 minutes on the 2-core machine (91 s measured with other jobs
sharing it; 4-20 s per loss).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import structloss_fast as slf
from structloss_fast._train import progress_bar


def load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


@torch.no_grad()
def recall_at_1(emb: torch.Tensor, labels: torch.Tensor) -> float:
    e = nn.functional.normalize(emb, dim=1)
    s = e @ e.T
    s.fill_diagonal_(float("-inf"))
    return (labels[s.argmax(dim=1)] == labels).float().mean().item()


def mined(loss, miner):
    """PML's training-loop form: loss(emb, labels, miner(emb, labels)); our miners fuse into
    their loss's pass (no index lists)."""
    return lambda emb, labels: loss(emb, labels, miner(emb, labels))


class TwoViews:
    """Labels unused: two noisy views of each digit are each other's only positive
    (SelfSupervisedLoss, as PML's)."""

    def __init__(self, loss, noise=0.15):
        self.loss, self.noise = slf.SelfSupervisedLoss(loss), noise

    def step(self, model, x, gen):
        def view():
            return model(x + self.noise * torch.randn(x.shape, generator=gen))
        return self.loss(view(), view())


def losses(dim: int):
    return {
        "circle": slf.CircleLoss(m=0.25, gamma=64),
        "unified": slf.UnifiedLoss(),
        "multi_similarity": slf.MultiSimilarityLoss(),
        "supcon": slf.SupConLoss(temperature=0.1),
        "ntxent": slf.NTXentLoss(temperature=0.1),
        "contrastive": slf.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
        "triplet (all)": slf.TripletMarginLoss(margin=0.2),
        "triplet (batch hard)": slf.TripletMarginLoss(margin=0.2, mining="batch_hard"),
        "contrastive + memory": slf.CrossBatchMemory(slf.ContrastiveLoss(), embedding_size=dim, memory_size=512),
        # pytorch-metric-learning's mined training, with our miners, reducers and distances
        "circle + MS miner": mined(slf.CircleLoss(m=0.25, gamma=64), slf.MultiSimilarityMiner(epsilon=0.1)),
        "multi-sim + MS miner": mined(slf.MultiSimilarityLoss(), slf.MultiSimilarityMiner(epsilon=0.1)),
        "triplet + semihard miner": mined(slf.TripletMarginLoss(margin=0.2),
                                          slf.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
        "triplet + easy/semihard": mined(slf.TripletMarginLoss(margin=0.2), slf.BatchEasyHardMiner()),
        "contrastive + pair margin": mined(slf.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
                                           slf.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)),
        "circle + threshold + memory": slf.CrossBatchMemory(
            slf.CircleLoss(m=0.25, gamma=64, reducer=slf.ThresholdReducer(low=0.1, high=200.0)),
            embedding_size=dim, memory_size=512, miner=slf.MultiSimilarityMiner(epsilon=0.1)),
        "contrastive (cosine) + reg": slf.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0,
                                                          distance=slf.CosineSimilarity(),
                                                          embedding_regularizer=slf.LpRegularizer(),
                                                          embedding_reg_weight=0.01),
        "ntxent, two views (no labels)": TwoViews(slf.NTXentLoss(temperature=0.1)),
    }


def train(loss_fn, x, y, args, progress) -> nn.Module:
    model = make_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y) - args.batch + 1, args.batch):
            idx = perm[start:start + args.batch]
            if isinstance(loss_fn, TwoViews):
                loss = loss_fn.step(model, x[idx], gen)
            else:
                loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="train only these losses")
    args = ap.parse_args(argv)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed)
    results = {"raw pixels": recall_at_1(x_te, y_te), "untrained network": recall_at_1(make_model(args.seed)(x_te), y_te)}
    chosen = {k: v for k, v in losses(32).items() if not args.only or k in args.only}
    times = {}
    with progress_bar(args.epochs * len(chosen), "training") as progress:
        for name, loss_fn in chosen.items():
            progress.set_description(name)
            t0 = time.perf_counter()
            model = train(loss_fn, x_tr, y_tr, args, progress)
            times[name] = time.perf_counter() - t0
            with torch.no_grad():
                results[name] = recall_at_1(model(x_te), y_te)
    print(f"\nRecall@1 on {len(y_te)} held-out digits ({args.epochs} epochs, batch {args.batch}):")
    for name, r in results.items():
        print(f"  {name:<31} {r:.4f}" + (f"   (trained in {times[name]:.1f} s)" if name in times else ""))
    return results


if __name__ == "__main__":
    main()

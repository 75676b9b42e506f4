"""Data and metrics of the SEAL family (docs/spec/seal.md).

- `make_block_task`: SPEN's synthetic block task: 64-d Gaussian inputs, one random 64 x 16 linear
  map, 16 labels in blocks of 4 with exactly one label on per block (the argmax of the block):
  label structure an energy can learn and a per-label BCE model cannot express.
- `make_bibtex_like`: a bibtex-shaped set (1836 features, 159 labels, ~2.3 labels per example)
  from sklearn's make_multilabel_classification (the real datasets are downloads).
- `example_f1`: example-based F1 at a threshold, averaged over examples.
- `average_precision`: per-example average precision of the label ranking, averaged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate

Split = tuple[Tensor, Tensor]


def _split(x: Tensor, y: Tensor, sizes: dict) -> dict[str, Split]:
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = (x[start:start + n].contiguous(), y[start:start + n].contiguous())
        start += n
    return out


def make_block_task(n_train: int = 1000, n_val: int = 500, n_test: int = 1000, *, n_features: int = 64,
                    n_labels: int = 16, block_size: int = 4, noise: float = 0.0, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, Split]:
    """SPEN's block task: x ~ N(0, I) (n_features), a = x A (A a fixed random n_features x n_labels
    map, + optional Gaussian noise of std `noise` per label), and within every block of
    `block_size` labels exactly the argmax of a is on. Returns {"train", "val", "test"}: (x, y)."""
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if block_size < 1 or n_labels % block_size:
        raise ValueError(f"n_labels ({n_labels}) must be a positive multiple of block_size ({block_size})")
    _validate.number("noise", noise, lo=0.0)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_features, n_labels, generator=g, dtype=torch.float64)
    n = n_train + n_val + n_test
    x = torch.randn(n, n_features, generator=g, dtype=torch.float64)
    a = x @ A
    if noise > 0:
        a = a + noise * torch.randn(a.shape, generator=g, dtype=torch.float64)
    blocks = a.view(n, n_labels // block_size, block_size)
    y = torch.zeros_like(blocks).scatter_(2, blocks.argmax(2, keepdim=True), 1.0).view(n, n_labels)
    return _split(x.to(dtype), y.to(dtype), {"train": n_train, "val": n_val, "test": n_test})


def make_bibtex_like(n_train: int = 4880, n_val: int = 1000, n_test: int = 1515, *, n_features: int = 1836,
                     n_labels: int = 159, labels_per_example: int = 2, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> dict[str, Split]:
    """A bibtex-shaped multi-label set from sklearn.datasets.make_multilabel_classification:
    bag-of-words counts (log1p-scaled) over n_features words, n_labels labels, a Poisson number
    of labels per example with mean `labels_per_example` (an int for sklearn; with no example left
    unlabeled the mean is about 2.3 for 2, bibtex's is 2.4)."""
    from sklearn.datasets import make_multilabel_classification

    n = n_train + n_val + n_test
    X, Y = make_multilabel_classification(n_samples=n, n_features=n_features, n_classes=n_labels,
                                          n_labels=labels_per_example, allow_unlabeled=False, random_state=seed)
    x = torch.log1p(torch.as_tensor(X, dtype=torch.float64))
    y = torch.as_tensor(Y, dtype=torch.float64)
    return _split(x.to(dtype), y.to(dtype), {"train": n_train, "val": n_val, "test": n_test})


def _check_pair(scores: Tensor, targets: Tensor) -> None:
    _validate.tensor("scores", scores, ndim=2)
    _validate.tensor("targets", targets, ndim=2)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have one shape, got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")


def example_f1(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> float:
    """Example-based F1: per example 2 |pred & gold| / (|pred| + |gold|) with pred = scores >=
    threshold, averaged over examples; an example with no predicted and no gold label scores 1
    (sklearn's f1_score(average="samples", zero_division=1))."""
    _check_pair(scores, targets)
    pred = scores >= threshold
    gold = targets > 0.5
    inter = (pred & gold).sum(1).double()
    den = (pred.sum(1) + gold.sum(1)).double()
    f1 = torch.where(den > 0, 2 * inter / den.clamp_min(1), torch.ones_like(den))
    return f1.mean().item() if f1.numel() else float("nan")


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Per-example average precision of the ranking of the labels by score, averaged over the
    examples with at least one gold label: mean over the gold labels j of
    |{gold k: s_k >= s_j}| / |{k: s_k >= s_j}| (ties share a rank, as sklearn's
    average_precision_score(average="samples") counts them)."""
    _check_pair(scores, targets)
    s = scores.detach().double()
    gold = (targets > 0.5).double()
    aps = []
    for i in range(0, s.shape[0], 256):  # chunks: O(chunk x L x L) comparisons
        sc, gc = s[i:i + 256], gold[i:i + 256]
        ge = (sc.unsqueeze(1) >= sc.unsqueeze(2)).double()  # ge[n, j, k] = s_k >= s_j
        n_ge = ge.sum(2)
        gold_ge = (ge * gc.unsqueeze(1)).sum(2)
        prec = gold_ge / n_ge
        n_gold = gc.sum(1)
        ap = (prec * gc).sum(1) / n_gold.clamp_min(1)
        aps.append(ap[n_gold > 0])
    aps = torch.cat(aps) if aps else torch.zeros(0)
    return aps.mean().item() if aps.numel() else float("nan")

"""scikit-learn's digits (bundled, offline) for the examples: images and a per-class split."""
import torch


def load(seed: int, test_fraction: float = 0.25):
    """(x (1797, 64) in [0, 1], y, train indices, test indices), each class split
    test_fraction / 1 - test_fraction by a permutation drawn from `seed`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(idx.numel() * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return x, y, torch.cat(train), torch.cat(test), g

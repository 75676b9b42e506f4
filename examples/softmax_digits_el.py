"""Cross-entropy vs the Encouraging Loss on scikit-learn's digits (8x8 images, 10 classes).

Trains the same small MLP with CE and with EL at log_end (LE) = 1, 0.75 and 0.5, and prints per
epoch the test accuracy and the mean magnitude of the per-example gradient on the target logit,
|d loss_i / d z_y|. With CE that gradient is 1 - p_y and vanishes as the examples become
well classified; with EL (rho = 1) it is (1 - p_y) + p_y = 1 below LE and
(1 - p_y)(1 + p_y / (1 - LE)) above it (the conservative bonus), so well-classified examples
keep contributing -- until 1 - p_y falls below the authors' eps clamp (1e-5), where the bonus
is constant and the gradient is 1 - p_y again. On digits many training examples get there,
so the mean stays well above CE's without staying at 1.

    python examples/softmax_digits_el.py            # 20 epochs x 4 losses, about 6 s on the 2-core machine
    python examples/softmax_digits_el.py --epochs 5
"""
from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import structloss_fast as slf
from structloss_fast._train import progress_bar

SETTINGS = [
    ("CE", dict(bonus_weight=0.0)),
    ("EL LE=1", dict(bonus_weight=1.0, log_end=1.0)),
    ("EL LE=0.75", dict(bonus_weight=1.0, log_end=0.75)),
    ("EL LE=0.5", dict(bonus_weight=1.0, log_end=0.5)),
]


def data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(name, opts, x_tr, y_tr, x_te, y_te, epochs, batch, lr, seed, bar):
    net = model(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        grad_sum, count = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            logits = net(x_tr[idx])
            logits.retain_grad()
            loss = slf.encouraging_loss(logits, y_tr[idx], **opts)  # mean over the batch
            opt.zero_grad()
            loss.backward()
            # Per-example gradient on the target logit (undo the batch mean).
            g_target = logits.grad[torch.arange(len(idx)), y_tr[idx]].abs() * len(idx)
            grad_sum += g_target.sum().item()
            count += len(idx)
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x_te).argmax(dim=1) == y_te).float().mean().item()
            p_train = torch.softmax(net(x_tr), dim=1)[torch.arange(len(y_tr)), y_tr].mean().item()
        history.append((epoch + 1, acc, grad_sum / count, p_train))
        bar.set_postfix_str(f"{name}: epoch {epoch + 1} acc {acc:.3f}")
        bar.update(1)
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=5, help="print every this many epochs (and the last)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a 64-64-10 MLP: threads only add overhead
    x_tr, y_tr, x_te, y_te = data(args.seed)
    t0 = time.time()
    results = {}
    with progress_bar(args.epochs * len(SETTINGS), "training") as bar:
        for name, opts in SETTINGS:
            results[name] = train(name, opts, x_tr, y_tr, x_te, y_te, args.epochs, args.batch, args.lr, args.seed,
                                  bar)
    print(f"\ndigits: {len(x_tr)} train / {len(x_te)} test, MLP 64-64-10, SGD lr={args.lr}, batch {args.batch}, "
          f"{time.time() - t0:.1f} s")
    print("mean |d loss_i / d z_target| per epoch (CE: 1 - p, vanishes; EL: stays near 1 below LE)\n")
    header = f"{'epoch':>5} " + " ".join(f"{name + ' acc':>15} {'|g_y|':>7}" for name in results)
    print(header)
    print("-" * len(header))
    for e in range(args.epochs):
        if (e + 1) % args.every and e + 1 != args.epochs and e != 0:
            continue
        row = f"{e + 1:>5} "
        for name, hist in results.items():
            _, acc, g, _ = hist[e]
            row += f"{acc:>15.4f} {g:>7.4f} "
        print(row)
    print("\nfinal: " + ", ".join(f"{name} acc {hist[-1][1]:.4f} (train p_y {hist[-1][3]:.4f})"
                                  for name, hist in results.items()))
    return results


if __name__ == "__main__":
    main()

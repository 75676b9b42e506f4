"""Do adversarially robust source models transfer better? On scikit-learn's digits: source
models (an MLP 64-256-128-5) trained on digits 0-4 with standard training, PGD adversarial
training (Madry et al.) at an epsilon sweep in L2 and L-inf, and TRADES; each transferred to
digits 5-9 with few labels, fixed-feature (only a new last layer trained on the frozen
features) and full-network (everything fine-tuned). 3 seeds; a table of mean +- std and a plot.

    python examples/adversarial_transfer_digits.py            # defaults: 3 seeds, 43 s on the 2-core machine (docs/adversarial.md)
    python examples/adversarial_transfer_digits.py --quick    # a smoke run (seconds)

Pixels are scaled to [0, 1] (the attacks stay in that box); an 8x8 digit has an L2 norm of
about 3-4 on this scale. Robust accuracy is measured with PGD-20 (random start) at L2 eps 1.0
and L-inf eps 0.1 on the source test set, both radii of the sweep attacked in one batched call
(pgd_attack with a list of radii). Writes adversarial_transfer_digits.png and .json to --out
(default docs/).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import structloss_fast as slf  # noqa: E402
from structloss_fast._train import progress_bar  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CLAMP = (0.0, 1.0)


def load_tasks(seed: int, target_per_class: int, test_fraction: float = 0.25):
    """Source: digits 0-4 (train/test); target: digits 5-9 relabelled 0-4, target_per_class
    training images per class and the held-out test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"src_train": [], "src_test": [], "tgt_train": [], "tgt_test": []}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(idx.numel() * test_fraction))
        if c < 5:
            parts["src_test"].append(idx[:k])
            parts["src_train"].append(idx[k:])
        else:
            parts["tgt_test"].append(idx[:k])
            parts["tgt_train"].append(idx[k:k + target_per_class])
    out = {}
    for name, idx in parts.items():
        idx = torch.cat(idx)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        out[name] = (x[idx], y[idx] % 5)
    return out


def source_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 5))


def train_source(model, data, *, kind, norm, eps, args, seed):
    """Standard (kind "standard"), PGD adversarial ("pgd") or TRADES ("trades") training."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    attack = dict(eps=eps, norm=norm, n_iter=args.train_iter, clamp=CLAMP, generator=g)
    for _ in progress_bar(desc=f"source {kind} {norm} {eps}", enabled=args.progress,
                          iterable=range(args.source_epochs)):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], args.batch_size):
            xb, yb = x[perm[i:i + args.batch_size]], y[perm[i:i + args.batch_size]]
            if kind == "standard":
                loss = F.cross_entropy(model(xb), yb)
            elif kind == "pgd":
                loss = slf.pgd_adversarial_loss(model, xb, yb, **attack)
            else:
                loss = slf.trades_loss(model, xb, yb, beta=args.beta, **attack)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def robust_accuracies(model, x, y, seed):
    """PGD-20 accuracy at L2 eps 1.0 and L-inf eps 0.1; each norm's radii in one batched attack."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for norm, radii in (("l2", [1.0]), ("linf", [0.1])):
        adv = slf.pgd_attack(model, x, y, norm=norm, eps=radii, n_iter=20, clamp=CLAMP, generator=g)
        for e, r in enumerate(radii):
            out[f"{norm} {r}"] = accuracy(model, adv[e], y)
    return out


def mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    m, s = mean_std(100 * v for v in values)
    return f"{m:.1f} +- {s:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--l2", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0], help="L2 radii of robust training")
    ap.add_argument("--linf", type=float, nargs="*", default=[0.05, 0.1, 0.2], help="L-inf radii of robust training")
    ap.add_argument("--trades", type=float, nargs="*", default=[0.1], help="L-inf radii of TRADES training")
    ap.add_argument("--beta", type=float, default=6.0, help="TRADES' beta")
    ap.add_argument("--source-epochs", type=int, default=30)
    ap.add_argument("--train-iter", type=int, default=7, help="PGD steps during robust training")
    ap.add_argument("--target-per-class", type=int, default=20, help="target training images per class")
    ap.add_argument("--fixed-epochs", type=int, default=100, help="epochs of the new last layer (fixed-feature)")
    ap.add_argument("--full-epochs", type=int, default=40, help="epochs of full-network fine-tuning")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the networks are small)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 2 radii, few epochs")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.l2, args.linf, args.trades = [0, 1], [0.5], [0.1], [0.1]
        args.source_epochs, args.train_iter, args.fixed_epochs, args.full_epochs = 3, 3, 5, 3
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    sources = [("standard", "-", 0.0)] + [("pgd", "l2", e) for e in args.l2] + [("pgd", "linf", e) for e in args.linf]
    sources += [("trades", "linf", e) for e in args.trades]
    label = {s: ("standard" if s[0] == "standard" else f"{'PGD' if s[0] == 'pgd' else 'TRADES'} {s[1]} {s[2]:g}")
             for s in sources}
    keys = ("source", "l2 1.0", "linf 0.1", "fixed-feature", "full-network", "time_s")
    results = {label[s]: {k: [] for k in keys} for s in sources}
    scratch = []
    t_start = time.perf_counter()
    for seed in args.seeds:
        data = load_tasks(seed, args.target_per_class)
        torch.manual_seed(seed)
        init = source_model()
        for s in sources:
            kind, norm, eps = s
            t0 = time.perf_counter()
            model = train_source(copy.deepcopy(init), data["src_train"], kind=kind, norm="l2" if norm == "-" else norm,
                                 eps=eps, args=args, seed=seed)
            r = results[label[s]]
            r["time_s"].append(time.perf_counter() - t0)
            r["source"].append(accuracy(model, *data["src_test"]))
            for k, v in robust_accuracies(model, *data["src_test"], seed).items():
                r[k].append(v)
            torch.manual_seed(seed + 1000)  # the new head's initialisation: the same for every source
            common = dict(n_classes=5, batch_size=args.batch_size, lr=args.target_lr, progress=args.progress,
                          generator=torch.Generator().manual_seed(seed))
            fixed = slf.transfer(model, data["tgt_train"], data["tgt_test"], modes="fixed-feature",
                                 epochs=args.fixed_epochs, **common)
            torch.manual_seed(seed + 1000)
            full = slf.transfer(model, data["tgt_train"], data["tgt_test"], modes="full-network",
                                epochs=args.full_epochs, **common)
            r["fixed-feature"].append(fixed["fixed-feature"].accuracy)
            r["full-network"].append(full["full-network"].accuracy)
            print(f"seed {seed}: {label[s]:<16} source {100 * r['source'][-1]:.1f}%, robust L2 1.0 "
                  f"{100 * r['l2 1.0'][-1]:.1f}% / L-inf 0.1 {100 * r['linf 0.1'][-1]:.1f}%; target fixed-feature "
                  f"{100 * r['fixed-feature'][-1]:.1f}%, full-network {100 * r['full-network'][-1]:.1f}% "
                  f"({r['time_s'][-1]:.1f} s)", flush=True)
        # reference point: the target network trained from scratch on the same few labels
        torch.manual_seed(seed + 1000)
        fresh = slf.transfer(source_model(), data["tgt_train"], data["tgt_test"], modes="full-network",
                             epochs=args.full_epochs, n_classes=5, batch_size=args.batch_size, lr=args.target_lr,
                             progress=args.progress, generator=torch.Generator().manual_seed(seed))
        scratch.append(fresh["full-network"].accuracy)
    elapsed = time.perf_counter() - t_start

    n_tgt = args.target_per_class * 5
    print(f"\nTransfer digits 0-4 -> 5-9 ({n_tgt} target training images); {len(args.seeds)} seeds {args.seeds}; "
          f"percent, mean +- std over seeds; {elapsed:.0f} s in all")
    print("| source model | source accuracy | robust acc. L2 1.0 | robust acc. L-inf 0.1 | fixed-feature | "
          "full-network |")
    print("|---|---|---|---|---|---|")
    for s in sources:
        r = results[label[s]]
        print(f"| {label[s]} | {fmt(r['source'])} | {fmt(r['l2 1.0'])} | {fmt(r['linf 0.1'])} | "
              f"{fmt(r['fixed-feature'])} | {fmt(r['full-network'])} |")
    print(f"| (no source: target network from scratch) | - | - | - | - | {fmt(scratch)} |")
    summary = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results, "scratch": scratch,
               "elapsed_s": elapsed}
    with open(os.path.join(args.out, "adversarial_transfer_digits.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, label, sources, scratch, args, os.path.join(args.out, "adversarial_transfer_digits.png"))
    return summary


def plot(results, label, sources, scratch, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    std_label = label[sources[0]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, norm, radii in ((axes[0], "l2", args.l2), (axes[1], "linf", args.linf)):
        eps = [0.0] + list(radii)
        for mode, color in (("fixed-feature", "tab:blue"), ("full-network", "tab:red")):
            rows = [results[std_label][mode]] + [results[f"PGD {norm} {e:g}"][mode] for e in radii]
            vals = np.array(rows) * 100
            m, s = vals.mean(1), vals.std(1)
            ax.errorbar(eps, m, yerr=s, marker="o", color=color, capsize=3, label=f"{mode} (target)")
        src = np.array([results[std_label]["source"]] + [results[f"PGD {norm} {e:g}"]["source"] for e in radii]) * 100
        ax.plot(eps, src.mean(1), "k--", marker=".", linewidth=1, label="source accuracy (0-4)")
        ax.axhline(100 * np.mean(scratch), color="gray", linestyle=":", label="target from scratch")
        ax.set_xlabel(f"{'L2' if norm == 'l2' else 'L-inf'} radius of PGD source training (0 = standard)")
        ax.set_title(f"digits 0-4 -> 5-9, {args.target_per_class * 5} target labels, {norm}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean +- std over seeds")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

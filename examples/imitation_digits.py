"""Go Wide, Then Narrow on scikit-learn's digits (8x8, 1797 images, 25% held out per class): a
deep thin MLP (8 blocks of width 16, plain Linear + ReLU) trained from scratch against the same
thin network trained by WideThenNarrow (a 128-wide MLP of the same depth trained first, then
layer-wise imitation of all its prefixes, then the adapters merged and the thin network
fine-tuned). 3 seeds; a table of mean +- std and a plot.

    python examples/imitation_digits.py              # defaults: 3 seeds, 38 s on the 2-core machine (docs/imitation.md)
    python examples/imitation_digits.py --quick      # a smoke run (seconds)
    python examples/imitation_digits.py --schedule progressive

Methods (each seed starts every method from the same initial thin network):
  scratch            the thin network, `--epochs` epochs of cross-entropy
  scratch, long      the thin network, `--wide-epochs + --epochs` epochs (as many passes over the
                     data as wide-then-narrow makes in all)
  wide-then-narrow   wide: `--wide-epochs`; imitation: `--imitation-epochs` with the layer
                     weights balanced (1 / the wide network's output power per layer); then
                     fine-tuning for `--epochs - --imitation-epochs` (the thin network's
                     epochs equal scratch's)
  wide-then-narrow, plain weights   the same with every layer weight 1 (the paper's plain sum)
Writes imitation_digits.png and imitation_digits.json to --out (default docs/).
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

import _digits  # noqa: E402  (examples/_digits.py)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """Digits as (N, 64) in [0, 1], split per class into train and test."""
    x, y, train, test, _ = _digits.load(seed, test_fraction)
    return x[train], y[train], x[test], y[test]


def mlp(width: int, depth: int) -> nn.Sequential:
    """depth blocks: (Linear + ReLU) x (depth - 1), then the Linear head."""
    blocks = [nn.Sequential(nn.Linear(64, width), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth - 2)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


@torch.no_grad()
def evaluate(model, x, y):
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    return {"acc": (logits.argmax(1) == y).double().mean().item(), "loss": F.cross_entropy(logits, y).item()}


def train_scratch(model, x, y, x_test, y_test, *, epochs, lr, batch_size, seed, progress):
    """Plain cross-entropy training with Adam; the test accuracy after every epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for _ in progress_bar(desc="scratch", enabled=progress, iterable=range(epochs)):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            sel = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[sel]), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(evaluate(model, x_test, y_test)["acc"])
    return curve


def run_win(wide, thin, x, y, x_test, y_test, *, args, seed, balanced, wide_trained=False):
    """The three stages (the first skipped when the wide network is already trained); returns
    (thin network, trained wide network, accuracy curve of the thin network over imitation +
    fine-tuning, per-layer imitation terms at the end of imitation)."""
    wtn = slf.WideThenNarrow(wide, thin, x[:8])
    kw = dict(lr=args.lr, batch_size=args.batch_size, progress=args.progress)
    if not wide_trained:
        wtn.fit_wide((x, y), epochs=args.wide_epochs, generator=torch.Generator().manual_seed(seed), **kw)
    trained_wide = copy.deepcopy(wtn.wide)
    if balanced:
        wtn.balance_weights(x)
    curve = []
    wtn.imitate((x, y), epochs=args.imitation_epochs, schedule=args.schedule,
                generator=torch.Generator().manual_seed(seed + 1),
                callback=lambda r: curve.append(evaluate(wtn, x_test, y_test)["acc"]), **kw)
    with torch.no_grad():
        terms = wtn.imitation_loss(x, per_layer=True).tolist()
    wtn.fine_tune((x, y), epochs=args.epochs - args.imitation_epochs, generator=torch.Generator().manual_seed(seed + 2),
                  callback=lambda r: curve.append(evaluate(wtn.thin, x_test, y_test)["acc"]), **kw)
    return wtn.thin, trained_wide, curve, terms


def mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, scale=100.0, digits=1):
    m, s = mean_std(v * scale for v in values)
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--thin", type=int, default=16, help="width of the thin network")
    ap.add_argument("--wide", type=int, default=128, help="width of the wide network")
    ap.add_argument("--epochs", type=int, default=60, help="the thin network's epochs (scratch; imitation + fine-tune)")
    ap.add_argument("--wide-epochs", type=int, default=60)
    ap.add_argument("--imitation-epochs", type=int, default=30)
    ap.add_argument("--schedule", choices=slf.imitation.SCHEDULES, default="joint")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the networks are small)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, small networks, few epochs")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.depth, args.wide, args.epochs, args.wide_epochs, args.imitation_epochs = [0, 1], 4, 32, 4, 4, 2
    if not 0 <= args.imitation_epochs <= args.epochs:
        ap.error("--imitation-epochs must be between 0 and --epochs")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    methods = ["scratch", "scratch, long", "wide-then-narrow", "wide-then-narrow, plain weights"]
    results = {m: {"acc": [], "loss": [], "time_s": [], "curve": []} for m in methods}
    results["wide (teacher)"] = {"acc": [], "loss": [], "time_s": []}
    terms = {"balanced": [], "plain": []}
    t_start = time.perf_counter()
    for seed in args.seeds:
        x, y, x_test, y_test = load_digits_split(seed)
        torch.manual_seed(seed)
        thin0, wide0 = mlp(args.thin, args.depth), mlp(args.wide, args.depth)
        trained_wide = None  # set by the balanced run, reused by the plain-weights run
        for method in methods:
            thin, wide = copy.deepcopy(thin0), copy.deepcopy(wide0)
            t0 = time.perf_counter()
            if method.startswith("scratch"):
                epochs = args.epochs + (args.wide_epochs if method == "scratch, long" else 0)
                curve = train_scratch(thin, x, y, x_test, y_test, epochs=epochs, lr=args.lr,
                                      batch_size=args.batch_size, seed=seed, progress=args.progress)
            else:
                # the plain-weights run reuses the balanced run's wide network (same stage 1)
                balanced = method == "wide-then-narrow"
                thin, trained_wide, curve, layer_terms = run_win(
                    wide if balanced else copy.deepcopy(trained_wide), thin, x, y, x_test, y_test, args=args,
                    seed=seed, balanced=balanced, wide_trained=not balanced)
                terms["balanced" if balanced else "plain"].append(layer_terms)
                if balanced:
                    wide_metrics = evaluate(trained_wide, x_test, y_test)
                    results["wide (teacher)"]["acc"].append(wide_metrics["acc"])
                    results["wide (teacher)"]["loss"].append(wide_metrics["loss"])
                    results["wide (teacher)"]["time_s"].append(float("nan"))
            r = results[method]
            r["time_s"].append(time.perf_counter() - t0)
            metrics = evaluate(thin, x_test, y_test)
            r["acc"].append(metrics["acc"])
            r["loss"].append(metrics["loss"])
            r["curve"].append(curve)
            print(f"seed {seed}: {method:<32} test accuracy {100 * metrics['acc']:.1f}%  "
                  f"({r['time_s'][-1]:.1f} s)", flush=True)
    elapsed = time.perf_counter() - t_start

    n_thin = sum(p.numel() for p in mlp(args.thin, args.depth).parameters())
    n_wide = sum(p.numel() for p in mlp(args.wide, args.depth).parameters())
    epochs_of = {"scratch": f"{args.epochs}", "scratch, long": f"{args.wide_epochs + args.epochs}",
                 "wide-then-narrow": f"{args.wide_epochs} wide + {args.imitation_epochs} + "
                                     f"{args.epochs - args.imitation_epochs}",
                 "wide-then-narrow, plain weights": f"(the same {args.wide_epochs} wide) + {args.imitation_epochs} + "
                                                    f"{args.epochs - args.imitation_epochs}",
                 "wide (teacher)": f"{args.wide_epochs}"}
    print(f"\nGo Wide, Then Narrow on digits: depth {args.depth}, thin width {args.thin} ({n_thin} parameters), "
          f"wide width {args.wide} ({n_wide}); {len(args.seeds)} seeds {args.seeds}; schedule {args.schedule}; "
          f"{elapsed:.0f} s in all")
    print("| method | test accuracy (%) | test loss | epochs | time per seed (s) |")
    print("|---|---|---|---|---|")
    for method in methods + ["wide (teacher)"]:
        r = results[method]
        t = "(in wide-then-narrow's)" if method == "wide (teacher)" else fmt(r["time_s"], 1.0, 1)
        print(f"| {method} | {fmt(r['acc'])} | {fmt(r['loss'], 1.0, 3)} | {epochs_of[method]} | {t} |")

    summary = {"args": {k: v for k, v in vars(args).items() if k != "out"},
               "params": {"thin": n_thin, "wide": n_wide}, "elapsed_s": elapsed,
               "results": results, "imitation_terms": terms}
    with open(os.path.join(args.out, "imitation_digits.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, terms, args, os.path.join(args.out, "imitation_digits.png"))
    return summary


def plot(results, terms, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"scratch": "tab:gray", "scratch, long": "black", "wide-then-narrow": "tab:blue",
              "wide-then-narrow, plain weights": "tab:orange"}
    for method, color in colors.items():
        curves = np.array(results[method]["curve"]) * 100
        x0 = args.wide_epochs if method.startswith("wide") else 0
        epochs = np.arange(1, curves.shape[1] + 1) + x0
        m, s = curves.mean(0), curves.std(0)
        ax.plot(epochs, m, color=color, label=method)
        ax.fill_between(epochs, m - s, m + s, color=color, alpha=0.15)
    ax.axvspan(args.wide_epochs, args.wide_epochs + args.imitation_epochs, color="tab:blue", alpha=0.06,
               label="imitation (adapted thin network)")
    wide_acc = 100 * np.mean(results["wide (teacher)"]["acc"])
    ax.axhline(wide_acc, color="tab:green", linestyle="--", linewidth=1, label=f"wide teacher ({wide_acc:.1f}%)")
    ax.set_xlabel("epochs (passes over the training set; the wide stage comes first)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("thin network, mean +- std over seeds")
    ax.legend(fontsize=7, loc="lower right")
    bal = np.array(terms["balanced"])
    layers = np.arange(1, bal.shape[1] + 1)
    bx.bar(layers, bal.mean(0), yerr=bal.std(0), color="tab:blue", capsize=3)
    bx.set_xlabel("prefix (block) i")
    bx.set_ylabel("w_i * MSE_i at the end of imitation")
    bx.set_title("imitation error per prefix (balanced weights:\nrelative to the wide output's power)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

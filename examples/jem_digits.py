"""JEM on scikit-learn's digits (8x8, scaled to [-1, 1]) against a cross-entropy baseline with the
same small CNN: accuracy, calibration (ECE, 20 bins, reliability diagrams), OOD detection
(AUROC of the three scores against noise and shifted digits), PGD robust accuracy (L-inf and L2,
40 iterations, with and without SGLD refinement), and a grid of SGLD samples.

    python examples/jem_digits.py                # defaults: 3 seeds, about 5 min on the 2-core machine (docs/jem.md)
    python examples/jem_digits.py --seeds 0 --epochs 10
    python examples/jem_digits.py --quick        # a smoke run (seconds)

Writes reliability.png, samples.png and results.json to --out (default jem_digits_out/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from structloss_fast._train import progress_bar  # noqa: E402
from structloss_fast.jem import evaluation as jem_eval  # noqa: E402
from structloss_fast.jem import JEMDivergenceError, JEMTrainer  # noqa: E402
from structloss_fast.jem.models import SmallCNN  # noqa: E402

import _digits  # noqa: E402  (examples/_digits.py)


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.25):
    """Digits as (N, 1, 8, 8) in [-1, 1], split per class into train and test."""
    x, y, train, test, g = _digits.load(seed, test_fraction)
    x = x.view(-1, 1, 8, 8) * 2 - 1
    # interleave the classes (any prefix, e.g. the attacked subset, holds every class)
    train = train[torch.randperm(train.numel(), generator=g)]
    test = test[torch.randperm(test.numel(), generator=g)]
    return x[train], y[train], x[test], y[test]


def ood_sets(x_test: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    n = x_test.shape[0]
    return {
        "noise": torch.rand((n, 1, 8, 8), generator=g) * 2 - 1,        # uniform noise images
        "inverted": -x_test,                                             # contrast-inverted digits
        "shifted": torch.roll(x_test, shifts=(3, 3), dims=(2, 3)),      # digits moved by 3 pixels (wrapped)
    }


def train_baseline(model, x, y, *, epochs, batch_size, lr, data_noise, seed, progress):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    steps = epochs * (n // batch_size)
    bar = progress_bar(steps, "CE baseline", progress)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            sel = perm[i:i + batch_size]
            xb = x[sel] + data_noise * torch.randn(x[sel].shape, generator=g)
            loss = F.cross_entropy(model(xb), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    bar.close()


def evaluate(model, x_test, y_test, oods, args, sampler_kwargs):
    gen = torch.Generator().manual_seed(1)
    probs = jem_eval.predict_probs(model, x_test)
    res = {
        "accuracy": (probs.argmax(1) == y_test).double().mean().item(),
        "ece": jem_eval.expected_calibration_error(probs, y_test, n_bins=20).item(),
        "probs": probs,
    }
    for name, x_out in oods.items():
        for score, value in jem_eval.ood_auroc(model, x_test, x_out).items():
            res[f"auroc_{name}_{score}"] = value
    n_adv = min(args.n_adv, x_test.shape[0])
    xa, ya = x_test[:n_adv], y_test[:n_adv]
    for norm, eps in (("linf", args.eps_linf), ("l2", args.eps_l2)):
        res[f"pgd_{norm}"] = jem_eval.robust_accuracy(model, xa, ya, norm=norm, eps=eps, n_iter=args.pgd_iters,
                                                      generator=gen)
        if args.refine_steps > 0:
            res[f"pgd_{norm}_sgld{args.refine_steps}"] = jem_eval.robust_accuracy(
                model, xa, ya, norm=norm, eps=eps, n_iter=args.pgd_iters, sgld_steps=args.refine_steps,
                sgld=sampler_kwargs, generator=gen)
    return res


def save_samples_png(samples: torch.Tensor, labels: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    cols = 10
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(samples[k, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_title(str(int(labels[k])), fontsize=7)
    fig.suptitle("JEM SGLD samples (replay buffer after training; title = predicted class)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} +- {100 * statistics.stdev(values):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both models)")
    ap.add_argument("--warmup-iters", type=int, default=100)
    ap.add_argument("--width", type=int, default=16, help="SmallCNN width")
    ap.add_argument("--n-steps", type=int, default=20, help="SGLD steps per iteration (persistent chains)")
    ap.add_argument("--sgld-step", type=float, default=1.0)
    ap.add_argument("--sgld-std", type=float, default=0.01)
    ap.add_argument("--variant", default="jem", choices=["jem", "jem++", "sada-jem"])
    ap.add_argument("--buffer-size", type=int, default=10000)
    ap.add_argument("--energy-l2", type=float, default=0.0, help="L2 penalty on the energies (0 = original JEM)")
    ap.add_argument("--data-noise", type=float, default=0.03)
    ap.add_argument("--eps-linf", type=float, default=0.1, help="PGD L-inf radius (inputs in [-1, 1])")
    ap.add_argument("--eps-l2", type=float, default=1.0, help="PGD L2 radius")
    ap.add_argument("--pgd-iters", type=int, default=40)
    ap.add_argument("--n-adv", type=int, default=200, help="test points attacked")
    ap.add_argument("--refine-steps", type=int, default=10, help="SGLD refinement steps after the attack (0: off)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: this network is too small to gain from more, and shared cores hurt them)")
    ap.add_argument("--out", default="jem_digits_out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 epochs, small buffer and attack")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.n_steps, args.buffer_size = [0], 2, 5, 1000
        args.pgd_iters, args.n_adv, args.refine_steps, args.warmup_iters = 5, 50, 2, 10
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t_start = time.time()

    x_train, y_train, x_test, y_test = load_digits_tensors()
    # the authors' test-time input noise, fixed for every model
    x_test = x_test + args.data_noise * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(123))
    print(f"digits: {x_train.shape[0]} train / {x_test.shape[0]} test, 8x8 in [-1, 1]; SmallCNN(width={args.width}); "
          f"JEM {args.variant}: {args.n_steps} SGLD steps (step {args.sgld_step}, std {args.sgld_std}), "
          f"buffer {args.buffer_size}, Adam lr {args.lr}, {args.epochs} epochs, seeds {args.seeds}", flush=True)

    sampler_kwargs = dict(step_size=args.sgld_step, noise_std=args.sgld_std)
    results = {"jem": [], "baseline": []}
    diverged = []
    first = {}
    for seed in args.seeds:
        oods = ood_sets(x_test, seed)
        # ---- JEM
        torch.manual_seed(seed)
        model = SmallCNN(1, 10, image_size=8, width=args.width)
        trainer = JEMTrainer(
            model, n_classes=10, sample_shape=(1, 8, 8), lr=args.lr, warmup_iters=args.warmup_iters,
            buffer_size=args.buffer_size, n_steps=args.n_steps, variant=args.variant,
            sgld=dict(step_size=args.sgld_step, noise_std=args.sgld_std), energy_l2=args.energy_l2,
            data_noise=args.data_noise, generator=torch.Generator().manual_seed(seed), progress=progress,
        )
        t0 = time.time()
        try:
            trainer.fit((x_train, y_train), epochs=args.epochs, batch_size=args.batch_size, desc=f"JEM seed {seed}")
            status = "ok"
        except JEMDivergenceError as exc:
            status = "diverged"
            diverged.append(seed)
            print(f"seed {seed}: {exc}", flush=True)
        t_jem = time.time() - t0
        if status == "ok":
            r = evaluate(model, x_test, y_test, oods, args, sampler_kwargs)
            r["train_s"] = t_jem
            results["jem"].append(r)
            if "jem" not in first:
                first["jem"] = r["probs"]
                samples = trainer.buffer.buffer[torch.randperm(args.buffer_size, generator=torch.Generator().manual_seed(0))[:100]]
                preds = jem_eval.predict_logits(model, samples).argmax(1)
                order = torch.argsort(preds, stable=True)
                save_samples_png(samples[order], preds[order], os.path.join(args.out, "samples.png"))
            print(f"seed {seed} JEM: {t_jem:.0f} s, accuracy {100 * r['accuracy']:.1f}%, ECE {100 * r['ece']:.2f}%",
                  flush=True)
        # ---- baseline, same network and optimizer
        torch.manual_seed(seed)
        base = SmallCNN(1, 10, image_size=8, width=args.width)
        t0 = time.time()
        train_baseline(base, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       data_noise=args.data_noise, seed=seed, progress=progress)
        r = evaluate(base, x_test, y_test, oods, args, sampler_kwargs)
        r["train_s"] = time.time() - t0
        results["baseline"].append(r)
        if "baseline" not in first:
            first["baseline"] = r["probs"]
        print(f"seed {seed} CE baseline: {r['train_s']:.0f} s, accuracy {100 * r['accuracy']:.1f}%, "
              f"ECE {100 * r['ece']:.2f}%", flush=True)

    # reliability diagrams of the first seed, side by side
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("baseline", "jem") if k in first]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, k in zip(axes[0], panels):
        jem_eval.reliability_diagram(first[k], y_test, ax=ax, n_bins=20,
                                     title=f"{'JEM' if k == 'jem' else 'CE baseline'} (seed {args.seeds[0]})")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "reliability.png"), dpi=110)
    plt.close(fig)

    # ---- report (percent; mean +- std over seeds)
    keys = ["accuracy", "ece"]
    keys += [f"auroc_{o}_{s}" for o in ("noise", "inverted", "shifted") for s in jem_eval.OOD_SCORES]
    keys += [k for k in (results["jem"] or results["baseline"])[0] if k.startswith("pgd_")]
    labels = {"accuracy": "accuracy", "ece": "ECE (20 bins)"}
    for k in keys:
        if k.startswith("auroc_"):
            _, o, s = k.split("_", 2)
            labels[k] = f"OOD AUROC {o} / {s}"
        elif k.startswith("pgd_"):
            parts = k.split("_")
            eps = args.eps_linf if parts[1] == "linf" else args.eps_l2
            labels[k] = (f"PGD-{args.pgd_iters} {parts[1].upper().replace('LINF', 'L-inf')} eps={eps:g} robust acc"
                         + (f" + {args.refine_steps} SGLD steps" if len(parts) > 2 else ""))
    print(f"\nresults over seeds {args.seeds} (percent, mean +- std; test set {x_test.shape[0]}, "
          f"PGD on the first {min(args.n_adv, x_test.shape[0])}):")
    print(f"{'metric':<52} {'JEM':>16} {'CE baseline':>16}")
    print("-" * 86)
    for k in keys:
        cells = [summarize([r[k] for r in results[m]]) if results[m] else "-" for m in ("jem", "baseline")]
        print(f"{labels[k]:<52} {cells[0]:>16} {cells[1]:>16}")
    n_ok = len(results["jem"])
    print(f"\nJEM diverged in {len(diverged)} of {len(args.seeds)} seeds" + (f" ({diverged})" if diverged else "")
          + f"; {n_ok} trained to the end.")
    if results["jem"] and results["baseline"]:
        e_j = statistics.fmean(r["ece"] for r in results["jem"])
        e_b = statistics.fmean(r["ece"] for r in results["baseline"])
        lower = "JEM" if e_j < e_b else "the CE baseline"
        print(f"ECE: JEM {100 * e_j:.2f}% vs CE baseline {100 * e_b:.2f}% -> {lower} is better calibrated here.")
    out = {m: [{k: v for k, v in r.items() if k != "probs"} for r in rs] for m, rs in results.items()}
    out["diverged_seeds"] = diverged
    out["args"] = vars(args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}/reliability.png, samples.png, results.json ({time.time() - t_start:.0f} s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

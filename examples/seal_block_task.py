"""SEAL on SPEN's synthetic block task: a BCE-only task-net, SEAL-static NCE, SEAL-dynamic NCE and
SPEN (SSVM training, gradient-based inference at test time), over several seeds.

    python examples/seal_block_task.py              # 3 seeds, 203-264 s on the 2-core machine (docs/seal.md)
    python examples/seal_block_task.py --quick      # a smoke test (seconds)

The block task (structloss_fast.seal.data.make_block_task): 64-d Gaussian inputs, a random linear
map to 16 labels in 4 blocks of 4, and exactly one label on per block (the block's argmax).
Prints a table of test example-F1 (threshold 0.5), per-example mean average precision, and the
test-time latency per example (one example at a time, and amortised over a batch of 1000).

The task-net and the energy's feature network are the same 2-layer softplus MLP (128 units here;
the paper's 400 is the bibtex size). SEAL-dynamic uses a shortened schedule (5 loss-net steps and
one task-net step per batch, task loss weight 1.0) so that three seeds fit in minutes on a CPU;
the authors' bibtex schedule (5 rounds of 12 loss-net steps and one task-net step per batch,
weight 5.51) is train_seal_dynamic's default, and --authors-schedule selects it (about 10x slower).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import structloss_fast as slf
from structloss_fast._train import progress_bar
from structloss_fast.seal import data as D
from structloss_fast.seal import train as T

METHODS = ("BCE", "SEAL-static NCE", "SEAL-dynamic NCE", "SPEN (GBI)")


def run_seed(seed: int, args) -> dict:
    data = D.make_block_task(args.n_train, args.n_val, args.n_test, seed=seed)
    cfg = T.TrainConfig(epochs=args.epochs, lr=args.lr, energy_lr=args.lr, seed=seed, progress=not args.no_progress,
                        patience=args.patience)
    n_feat, n_lab = data["train"][0].shape[1], data["train"][1].shape[1]
    x_test, y_test = data["test"]
    results = {}

    def new_energy():
        return slf.EnergyNet(n_feat, n_lab, hidden=args.hidden, global_hidden=args.global_hidden)

    def record(name, predict, hist):
        with torch.no_grad():
            probs = predict(x_test)
        res = T.evaluate(probs, y_test)
        res["latency_1"] = T.latency_per_example(predict, x_test, batch_size=1, max_examples=args.latency_examples)
        res["latency_batch"] = T.latency_per_example(predict, x_test, batch_size=x_test.shape[0], repeats=3,
                                                     max_examples=x_test.shape[0])
        res["train_s"] = hist.seconds
        res["best_epoch"] = hist.best_epoch
        results[name] = res

    # Test-time predictors (the trainers leave the networks in eval mode): the task-net is one
    # forward pass; SPEN runs gradient-based inference on the energy.
    def task_predict(n):
        return lambda v: torch.sigmoid(n(v))

    torch.manual_seed(seed)
    net = T.TaskNet(n_feat, n_lab, hidden=args.hidden)
    h = T.train_bce(net, data, cfg)
    record("BCE", task_predict(net), h)

    torch.manual_seed(seed)
    net, energy = T.TaskNet(n_feat, n_lab, hidden=args.hidden), new_energy()
    h = T.train_seal_static(net, energy, data, cfg, loss="nce", pretrain_epochs=args.pretrain_epochs,
                            task_weight=args.static_weight, task_steps=1, num_samples=args.num_samples)
    record("SEAL-static NCE", task_predict(net), h)

    torch.manual_seed(seed)
    net, energy = T.TaskNet(n_feat, n_lab, hidden=args.hidden), new_energy()
    if args.authors_schedule:
        h = T.train_seal_dynamic(net, energy, data, cfg, loss="nce", num_samples=args.num_samples)
    else:
        h = T.train_seal_dynamic(net, energy, data, cfg, loss="nce", outer_rounds=1, loss_net_steps=5,
                                 task_weight=args.dynamic_weight, num_samples=args.num_samples)
    record("SEAL-dynamic NCE", task_predict(net), h)

    torch.manual_seed(seed)
    energy = new_energy()
    h = T.train_spen(energy, data, cfg, pretrain_epochs=args.pretrain_epochs, gbi_steps=args.gbi_steps,
                     step_size=args.gbi_step_size)
    record("SPEN (GBI)", lambda v, e=energy: slf.gbi_inference(e, v, steps=args.gbi_steps,
                                                            step_size=args.gbi_step_size), h)
    return results


def mean_sd(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--global-hidden", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=20, help="K, the NCE samples per example")
    ap.add_argument("--pretrain-epochs", type=int, default=20, help="SEAL-static loss-net / SPEN local pre-training")
    ap.add_argument("--static-weight", type=float, default=0.1)
    ap.add_argument("--dynamic-weight", type=float, default=1.0)
    ap.add_argument("--gbi-steps", type=int, default=20)
    ap.add_argument("--gbi-step-size", type=float, default=0.5)
    ap.add_argument("--latency-examples", type=int, default=200)
    ap.add_argument("--authors-schedule", action="store_true", help="SEAL-dynamic with 5 x (12 + 1) steps per batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small nets at batch 32: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 seeds: a smoke test")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.n_train, args.n_val, args.n_test = 2, 128, 64, 128
        args.epochs, args.pretrain_epochs, args.hidden, args.global_hidden = 2, 1, 32, 16
        args.num_samples, args.gbi_steps, args.latency_examples = 5, 5, 20
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    per_seed = []
    for seed in progress_bar(desc="seeds", enabled=not args.no_progress, iterable=range(args.seeds)):
        per_seed.append(run_seed(seed, args))
    elapsed = time.perf_counter() - t0

    print(f"\nSPEN block task: {args.n_train} train / {args.n_val} val / {args.n_test} test examples, "
          f"{args.seeds} seeds, {args.epochs} epochs max, hidden {args.hidden}, torch threads {args.threads}")
    header = (f"{'method':<18} {'example-F1':>16} {'mAP':>16} {'latency 1 ex (us)':>18} "
              f"{'latency batch (us/ex)':>22} {'train (s)':>10}")
    print(header)
    print("-" * len(header))
    summary = {}
    for name in METHODS:
        rows = [r[name] for r in per_seed]
        f1, f1_sd = mean_sd([r["example_f1"] for r in rows])
        ap_, ap_sd = mean_sd([r["map"] for r in rows])
        lat1 = statistics.fmean(r["latency_1"] for r in rows) * 1e6
        latb = statistics.fmean(r["latency_batch"] for r in rows) * 1e6
        tr = statistics.fmean(r["train_s"] for r in rows)
        summary[name] = (f1, lat1, latb)
        print(f"{name:<18} {f1:>9.4f} ± {f1_sd:.4f} {ap_:>9.4f} ± {ap_sd:.4f} {lat1:>18.1f} {latb:>22.2f} {tr:>10.1f}")
    print("\nper seed example-F1: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {r[n]['example_f1']:.4f}" for n in METHODS) for s, r in enumerate(per_seed)))
    wins = sum(r["SEAL-dynamic NCE"]["example_f1"] > r["BCE"]["example_f1"] for r in per_seed)
    print(f"SEAL-dynamic NCE above BCE-only in {wins} of {len(per_seed)} seeds "
          f"(mean {summary['SEAL-dynamic NCE'][0] - summary['BCE'][0]:+.4f} example-F1)")
    print(f"test-time latency, SPEN GBI / SEAL-dynamic task-net: "
          f"{summary['SPEN (GBI)'][1] / summary['SEAL-dynamic NCE'][1]:.1f}x one example at a time, "
          f"{summary['SPEN (GBI)'][2] / summary['SEAL-dynamic NCE'][2]:.1f}x per example in a batch of {args.n_test}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TaskMet on the cubic top-1 task (LODL; TaskMet paper, Sec. 5): MSE vs TaskMet over seeds.

50 items per instance, x ~ U[-1, 1], value y = 10 (x^3 - 0.65 x), a linear predictor
y^ = a x + b shared by the items, pick the item with the largest prediction. The least-squares
line has a negative slope on [-1, 1], so it picks about the worst item; TaskMet learns a
per-item metric that makes the refit line pick well. Prints the normalised test decision
quality per seed and the mean, and saves a plot of the data, both fitted lines and the learned
metric.

    python examples/taskmet_cubic.py                     # 5 seeds, the defaults (98 s on the 2-core machine, docs/taskmet.md)
    python examples/taskmet_cubic.py --seeds 0 --outer-steps 20 --plot /tmp/cubic.png
"""
from __future__ import annotations

import argparse
import sys

import torch

from structloss_fast.taskmet import TaskMetConfig
from structloss_fast.taskmet.tasks import DEFAULT_CONFIGS, compare, summary


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = res["models"][0]
    problem = run["problem"]
    xs = torch.linspace(-1, 1, 201, dtype=problem.dtype).reshape(1, -1, 1)
    with torch.no_grad():
        y_true = problem.value(xs).flatten()
        y_mse = run["mse"](xs).flatten()
        y_tm = run["taskmet"](xs).flatten()
        metric = run["metric"].metric(xs.reshape(-1, 1)).reshape(-1)
    x = xs.flatten()
    fig, axes = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [2.5, 1]})
    ax = axes[0]
    data_x = problem.x_train[:20].flatten()
    ax.scatter(data_x, problem.value(problem.x_train[:20]).flatten(), s=4, color="0.6", label="training items")
    ax.plot(x, y_true, color="k", label="y = 10 (x^3 - 0.65 x)")
    ax.plot(x, y_mse, label=f"MSE fit (test DQ {res['mse'][0]:+.2f})")
    ax.plot(x, y_tm, label=f"TaskMet fit (test DQ {res['taskmet'][0]:+.2f})")
    ax.set_ylabel("value")
    ax.set_title(f"Cubic top-1, seed {run['seed']}: linear predictors")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, metric, color="C2")
    ax.set_ylim(0, max(1.0, 1.1 * float(metric.max())))
    ax.set_xlabel("item feature x")
    ax.set_ylabel("learned metric Λ(x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = DEFAULT_CONFIGS["cubic"]
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--outer-steps", type=int, default=base.outer_steps)
    ap.add_argument("--solver", default=base.implicit_solver, choices=["cg", "normal_cg", "exact"])
    ap.add_argument("--plot", default="taskmet_cubic.png", help="PNG path ('' to skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at these sizes)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TaskMetConfig(**{**base.__dict__, "outer_steps": args.outer_steps, "implicit_solver": args.solver})
    res = compare("cubic", seeds=tuple(args.seeds), config=cfg, progress=not args.no_progress)
    print(f"\ncubic top-1, normalised test decision quality ({len(args.seeds)} seeds, {res['seconds']:.0f} s)")
    print(f"{'seed':>6} {'MSE':>8} {'TaskMet':>8}")
    for s, a, b in zip(args.seeds, res["mse"], res["taskmet"]):
        print(f"{s:>6} {a:>+8.3f} {b:>+8.3f}")
    (m_mse, s_mse), (m_tm, s_tm) = summary(res["mse"]), summary(res["taskmet"])
    print(f"{'mean':>6} {m_mse:>+8.3f} {m_tm:>+8.3f}   (std {s_mse:.3f} / {s_tm:.3f}; poster: -0.96 / 0.96)")
    if args.plot:
        plot(res, args.plot)
        print(f"plot: {args.plot}")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)

"""TaskMet on a synthetic factor-model portfolio task: MSE vs TaskMet over seeds.

50 assets; per asset a feature vector x and an expected return mu(x) (a fixed nonlinear
function); realized returns y = mu(x) + B f + e with a known factor covariance Sigma. The decision
is the long-only, fully invested Markowitz portfolio max_w y^T w - 0.1 w^T Sigma w, solved by the
batched simplex QP layer (structloss_fast.taskmet.tasks.simplex_qp, differentiable through its
KKT system). The predictor is a per-asset 2-layer MLP; the paper's market data is not available
here. Prints the normalised test decision quality per seed and the mean.

    python examples/taskmet_portfolio.py                 # 5 seeds, the defaults (281 s on the 2-core machine, docs/taskmet.md)
    python examples/taskmet_portfolio.py --seeds 0 --outer-steps 5
"""
from __future__ import annotations

import argparse
import sys

import torch

from structloss_fast.taskmet import TaskMetConfig
from structloss_fast.taskmet.tasks import DEFAULT_CONFIGS, compare, summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = DEFAULT_CONFIGS["portfolio"]
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--outer-steps", type=int, default=base.outer_steps)
    ap.add_argument("--inner-steps", type=int, default=base.inner_steps)
    ap.add_argument("--inner-steps-init", type=int, default=base.inner_steps_init)
    ap.add_argument("--mse-steps", type=int, default=base.mse_max_steps)
    ap.add_argument("--solver", default=base.implicit_solver, choices=["cg", "normal_cg", "exact"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at these sizes)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TaskMetConfig(**{**base.__dict__, "outer_steps": args.outer_steps, "inner_steps": args.inner_steps,
                           "inner_steps_init": args.inner_steps_init, "mse_max_steps": args.mse_steps,
                           "implicit_solver": args.solver})
    res = compare("portfolio", seeds=tuple(args.seeds), config=cfg, progress=not args.no_progress)
    print(f"\nfactor-model portfolio, normalised test decision quality ({len(args.seeds)} seeds, "
          f"{res['seconds']:.0f} s)")
    print(f"{'seed':>6} {'MSE':>8} {'TaskMet':>8}")
    for s, a, b in zip(args.seeds, res["mse"], res["taskmet"]):
        print(f"{s:>6} {a:>+8.3f} {b:>+8.3f}")
    (m_mse, s_mse), (m_tm, s_tm) = summary(res["mse"]), summary(res["taskmet"])
    print(f"{'mean':>6} {m_mse:>+8.3f} {m_tm:>+8.3f}   (std {s_mse:.3f} / {s_tm:.3f}; "
          "poster, real market data: 0.33 / 0.33)")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)

"""The predict-then-optimise tasks of the TaskMet paper (from LODL, Shah et al. 2022), rebuilt
for this package (docs/spec/taskmet.md), and the MSE-vs-TaskMet comparison over seeds.

- `CubicTopK`: 50 items per instance, x ~ U[-1, 1], y = 10 (x^3 - 0.65 x), a linear predictor
  shared across items, pick the top-1 item by prediction; differentiable top-k by entropic
  optimal transport (Sinkhorn, epsilon = 0.01, 200 iterations) for training, hard top-k for
  testing.
- `FactorPortfolio`: a synthetic factor-model market (the paper's market data is not available
  here): 50 assets, returns y = mu(x) + B f + e with known covariance Sigma = B B^T + D; the
  decision is the long-only, fully invested Markowitz portfolio max_w mu^T w - alpha w^T Sigma w
  (alpha = 0.1), solved by the batched `simplex_qp` layer (accelerated projected gradient, an
  exact KKT polish on the support, and a KKT backward).
- Decision quality is normalised per dataset as in LODL: (obj - random) / (optimal - random).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .._train import progress_bar
from .metric import MetricNet
from .trainer import TaskMetConfig, TaskMetTrainer

__all__ = ["soft_topk", "hard_topk", "project_simplex", "simplex_qp", "CubicTopK", "FactorPortfolio",
           "compare", "TASKS"]


# ---------------------------------------------------------------- top-k


def soft_topk(scores: Tensor, k: int, *, epsilon: float = 0.01, iters: int = 200) -> Tensor:
    """Differentiable top-k membership (Xie et al., NeurIPS 2020): entropy-regularised optimal
    transport of the n items (mass 1/n each) onto two anchors, "selected" (mass k/n) and "not
    selected" ((n - k)/n), with squared-distance costs of the negated scores to the anchors 0
    and 1, normalised by their largest value per instance; log-domain Sinkhorn, unrolled for
    autograd. Returns (..., n) in [0, 1] summing to k; epsilon -> 0 gives hard top-k."""
    n = scores.shape[-1]
    if not 0 < k < n:
        raise ValueError(f"k must be in (0, n = {n}), got {k}")
    s = -scores.unsqueeze(-1)
    anchors = torch.tensor([0.0, 1.0], dtype=scores.dtype, device=scores.device)
    C = (s - anchors).square()
    C = C / C.amax(dim=(-2, -1), keepdim=True)
    log_mu = torch.full(scores.shape, -math.log(n), dtype=scores.dtype, device=scores.device)
    log_nu = torch.log(torch.tensor([k / n, (n - k) / n], dtype=scores.dtype, device=scores.device))
    f = torch.zeros_like(log_mu)
    g = torch.zeros(scores.shape[:-1] + (2,), dtype=scores.dtype, device=scores.device)
    for _ in range(iters):
        f = epsilon * (log_mu - torch.logsumexp((g.unsqueeze(-2) - C) / epsilon, dim=-1))
        g = epsilon * (log_nu - torch.logsumexp((f.unsqueeze(-1) - C) / epsilon, dim=-2))
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / epsilon)
    return n * plan[..., 0]


def hard_topk(scores: Tensor, k: int) -> Tensor:
    idx = torch.topk(scores, k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


# ---------------------------------------------------------------- simplex QP layer


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto {w >= 0, sum w = 1} (sort-based, batched, no
    host synchronisation)."""
    n = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(dim=-1) - 1.0
    ind = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    rho = (u - css / ind > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0.0)


def _kkt_matrix(Q: Tensor, support: Tensor) -> Tensor:
    """[[Q_SS, 1_S], [1_S^T, 0]] embedded in (B, n + 1, n + 1): rows / columns off the support
    become identity rows, so those weights solve to 0."""
    B, n = support.shape
    m = support.to(Q.dtype)
    K = Q.expand(B, n, n) * (m.unsqueeze(-1) * m.unsqueeze(-2)) + torch.diag_embed(1.0 - m)
    top = torch.cat([K, m.unsqueeze(-1)], dim=-1)
    bottom = torch.cat([m, torch.zeros(B, 1, dtype=Q.dtype, device=Q.device)], dim=-1).unsqueeze(-2)
    return torch.cat([top, bottom], dim=-2)


def _solve_simplex_qp(mu: Tensor, Q: Tensor, lipschitz: float, iters: int):
    """FISTA on 1/2 w^T Q w - mu^T w over the simplex, then the exact solution of the KKT system
    on the support found, kept where it is primal and dual feasible."""
    B, n = mu.shape
    w = torch.full_like(mu, 1.0 / n)
    y, t = w, 1.0
    step = 1.0 / lipschitz
    for _ in range(iters):
        w_new = project_simplex(y - step * (y @ Q - mu))
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = w_new + ((t - 1.0) / t_new) * (w_new - w)
        w, t = w_new, t_new
    support = w > 1e-9
    K = _kkt_matrix(Q, support)
    rhs = torch.cat([mu * support, torch.ones(B, 1, dtype=mu.dtype, device=mu.device)], dim=-1)
    sol = torch.linalg.solve(K, rhs)
    w_kkt, nu = sol[:, :n] * support, sol[:, n:]
    slack = w_kkt @ Q - mu + nu  # multipliers of w >= 0: must be >= 0 off the support
    tol = 1e-6 * (1.0 + mu.abs().amax(dim=-1, keepdim=True))
    ok = ((w_kkt >= -tol) | ~support).all(-1) & ((slack >= -tol) | support).all(-1)
    w_out = torch.where(ok.unsqueeze(-1), w_kkt.clamp(min=0.0), w)
    return w_out, torch.where(ok.unsqueeze(-1), support, w_out > 1e-9)


class _SimplexQP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, Q, lipschitz, iters):
        w, support = _solve_simplex_qp(mu, Q, lipschitz, iters)
        ctx.save_for_backward(Q, support)
        return w

    @staticmethod
    def backward(ctx, grad_w):
        Q, support = ctx.saved_tensors
        # Differentiate the KKT system on the support: K [dw; dnu] = [dmu_S; 0], K symmetric.
        K = _kkt_matrix(Q, support)
        rhs = torch.cat([grad_w * support, torch.zeros_like(grad_w[:, :1])], dim=-1)
        u = torch.linalg.solve(K, rhs)[:, : grad_w.shape[-1]]
        return u * support, None, None, None


def simplex_qp(mu: Tensor, Q: Tensor, *, iters: int = 200, lipschitz: Optional[float] = None) -> Tensor:
    """argmin_w 1/2 w^T Q w - mu^T w subject to w >= 0, sum w = 1, for each row of mu (B, n), with
    one SPD Q (n, n). Differentiable in mu (the KKT system on the support; exact where the
    support is stable)."""
    if mu.dim() != 2 or Q.shape != (mu.shape[-1], mu.shape[-1]):
        raise ValueError(f"mu must be (B, n) and Q (n, n), got {tuple(mu.shape)} and {tuple(Q.shape)}")
    if lipschitz is None:
        lipschitz = float(torch.linalg.eigvalsh(Q.detach()).max())
    return _SimplexQP.apply(mu, Q, lipschitz, iters)


# ---------------------------------------------------------------- tasks


def _split(n_train: int, val_frac: float):
    n_val = int(val_frac * n_train)
    return slice(0, n_val), slice(n_val, n_train)


class CubicTopK:
    """LODL's cubic top-k task (budget 1): see the module docstring."""

    name = "cubic"

    def __init__(self, seed: int = 0, *, n_train: int = 400, n_test: int = 400, n_items: int = 50, k: int = 1,
                 val_frac: float = 0.5, epsilon: float = 0.01, sinkhorn_iters: int = 200,
                 dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(1000 + seed)
        x_all = (2 * torch.rand(n_train, n_items, 1, generator=g) - 1).to(dtype)
        x_test = (2 * torch.rand(n_test, n_items, 1, generator=g) - 1).to(dtype)
        val, train = _split(n_train, val_frac)
        self.x_train, self.x_val, self.x_test = x_all[train], x_all[val], x_test
        self.y_train, self.y_val, self.y_test = (self.value(x) for x in (self.x_train, self.x_val, self.x_test))
        self.k, self.epsilon, self.sinkhorn_iters = k, epsilon, sinkhorn_iters
        self.dtype = dtype

    @staticmethod
    def value(x: Tensor) -> Tensor:
        return (10 * (x.pow(3) - 0.65 * x)).squeeze(-1)

    def make_predictor(self) -> nn.Module:
        """y^ = a x + b, shared by the items: (N, items, 1) -> (N, items)."""
        return nn.Sequential(nn.Linear(1, 1), nn.Flatten(-2)).to(self.dtype)

    def make_metric(self) -> nn.Module:
        """The authors' metric network on one item's feature (n = 1: a scalar metric per item)."""
        return MetricNet(1, 1, hidden=200).to(self.dtype)

    def samples(self, x, pred, y):
        return x.reshape(-1, 1), pred.reshape(-1, 1), y.reshape(-1, 1)

    def task_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        z = soft_topk(pred, self.k, epsilon=self.epsilon, iters=self.sinkhorn_iters)
        return -(z * y).sum(dim=-1).mean()

    def objective(self, pred: Tensor, y: Tensor) -> Tensor:
        return (hard_topk(pred, self.k) * y).sum(dim=-1)

    def decision_quality(self, pred: Tensor, y: Tensor) -> Tensor:
        obj = self.objective(pred, y).mean()
        random = self.k * y.mean()  # expected objective of k items picked uniformly at random
        optimal = torch.topk(y, self.k, dim=-1).values.sum(dim=-1).mean()
        return (obj - random) / (optimal - random)


class FactorPortfolio:
    """Synthetic factor-model Markowitz task: see the module docstring.

    Per instance (a day) t and asset i: features x_ti ~ N(0, I_d); expected return
    mu_ti = 0.6 tanh(x_ti,0 + 0.5 x_ti,1 x_ti,2) + 0.3 relu(x_ti,3) - 0.15 ... (a fixed nonlinear
    function, see _mean_return); realized return y_t = mu_t + B f_t + e_t, f_t ~ N(0, I_K),
    e_t ~ N(0, diag(s^2)), Sigma = B B^T + diag(s^2). The per-asset predictor is a 2-layer MLP.
    """

    name = "portfolio"

    def __init__(self, seed: int = 0, *, n_train: int = 400, n_test: int = 400, n_assets: int = 50,
                 n_factors: int = 4, n_features: int = 5, alpha: float = 0.1, val_frac: float = 0.5,
                 hidden: int = 32, qp_iters: int = 100, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(2000 + seed)
        self.alpha, self.hidden, self.qp_iters, self.dtype = alpha, hidden, qp_iters, dtype
        B = 0.5 * torch.randn(n_assets, n_factors, generator=g, dtype=torch.float64)
        s = 0.3 + 0.4 * torch.rand(n_assets, generator=g, dtype=torch.float64)
        self.sigma = (B @ B.T + torch.diag(s.square())).to(dtype)
        n_all = n_train + n_test
        x = torch.randn(n_all, n_assets, n_features, generator=g, dtype=torch.float64)
        mu = self._mean_return(x)
        f = torch.randn(n_all, n_factors, generator=g, dtype=torch.float64)
        e = torch.randn(n_all, n_assets, generator=g, dtype=torch.float64) * s
        y = mu + f @ B.T + e
        x, y = x.to(dtype), y.to(dtype)
        val, train = _split(n_train, val_frac)
        self.x_train, self.y_train = x[:n_train][train], y[:n_train][train]
        self.x_val, self.y_val = x[:n_train][val], y[:n_train][val]
        self.x_test, self.y_test = x[n_train:], y[n_train:]
        self.Q = 2 * alpha * self.sigma
        self.lipschitz = float(torch.linalg.eigvalsh(self.Q.double()).max())
        self.n_features = n_features
        self._gen = torch.Generator().manual_seed(3000 + seed)
        self._refs: dict = {}

    @staticmethod
    def _mean_return(x: Tensor) -> Tensor:
        return (0.6 * torch.tanh(x[..., 0] + 0.5 * x[..., 1] * x[..., 2]) + 0.3 * torch.relu(x[..., 3])
                - 0.15 * x[..., 4].square())

    def make_predictor(self) -> nn.Module:
        """Per-asset 2-layer MLP: (N, assets, d) -> (N, assets)."""
        return nn.Sequential(nn.Linear(self.n_features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1),
                             nn.Flatten(-2)).to(self.dtype)

    def make_metric(self) -> nn.Module:
        return MetricNet(self.n_features, 1, hidden=200).to(self.dtype)

    def samples(self, x, pred, y):
        return x.reshape(-1, x.shape[-1]), pred.reshape(-1, 1), y.reshape(-1, 1)

    def decide(self, pred: Tensor) -> Tensor:
        return simplex_qp(pred, self.Q, iters=self.qp_iters, lipschitz=self.lipschitz)

    def objective(self, w: Tensor, y: Tensor) -> Tensor:
        return (w * y).sum(dim=-1) - self.alpha * ((w @ self.sigma) * w).sum(dim=-1)

    def task_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        return -self.objective(self.decide(pred), y).mean()

    def references(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(random, optimal) mean objectives on the instances y, computed once per dataset.
        Random is LODL's: decisions from U[0, 1) predictions, mean over 10 draws."""
        key = (y.data_ptr(), tuple(y.shape))
        if key not in self._refs:
            with torch.no_grad():
                optimal = self.objective(self.decide(y), y).mean()
                random = torch.stack([
                    self.objective(self.decide(torch.rand(y.shape, generator=self._gen, dtype=y.dtype)), y).mean()
                    for _ in range(10)]).mean()
            self._refs[key] = (random, optimal)
        return self._refs[key]

    def decision_quality(self, pred: Tensor, y: Tensor) -> Tensor:
        obj = self.objective(self.decide(pred), y).mean()
        random, optimal = self.references(y)
        return (obj - random) / (optimal - random)


TASKS = {"cubic": CubicTopK, "portfolio": FactorPortfolio}

DEFAULT_CONFIGS = {
    # The authors' settings: cubic pred_lr 0.1, outer batch 50; portfolio pred_lr 1e-2, batch 100.
    "cubic": TaskMetConfig(inner_lr=0.1, outer_batch=50, outer_steps=60),
    "portfolio": TaskMetConfig(inner_lr=1e-2, outer_batch=100, outer_steps=30, inner_steps_init=500,
                               inner_steps=100, implicit_maxiter=50, val_every=5, mse_max_steps=1000),
}


def compare(task: str, *, seeds=(0, 1, 2, 3, 4), config: Optional[TaskMetConfig] = None,
            task_kwargs: Optional[dict] = None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """MSE-trained vs TaskMet-trained predictors on `task`, normalised test decision quality
    per seed. Returns {"mse": [...], "taskmet": [...], "seconds": ..., "models": [...]}."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    cfg = config or DEFAULT_CONFIGS[task]
    out = {"mse": [], "taskmet": [], "mse_val": [], "taskmet_val": [], "models": []}
    t0 = time.time()
    bar = None
    if progress:
        bar = progress_bar(len(seeds) * cfg.outer_steps, f"{task}: TaskMet outer steps")
    for seed in seeds:
        problem = TASKS[task](seed, **(task_kwargs or {}))
        trainer = TaskMetTrainer(problem, cfg, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        mse_model = problem.make_predictor()
        trainer.fit_mse(mse_model)
        torch.manual_seed(seed)
        tm_model = problem.make_predictor()
        metric = problem.make_metric()

        def tick(it, hist):
            if bar is not None:
                bar.update(1)
                if hist["val_dq"]:
                    bar.set_postfix(seed=seed, val_dq=f"{hist['val_dq'][-1][1]:.3f}")

        hist = trainer.fit_taskmet(tm_model, metric, progress=tick)
        with torch.no_grad():
            dq_mse = float(problem.decision_quality(mse_model(problem.x_test), problem.y_test))
            dq_tm = float(problem.decision_quality(tm_model(problem.x_test), problem.y_test))
            out["mse_val"].append(float(problem.decision_quality(mse_model(problem.x_val), problem.y_val)))
        out["mse"].append(dq_mse)
        out["taskmet"].append(dq_tm)
        out["taskmet_val"].append(hist["best_val_dq"])
        out["models"].append({"seed": seed, "problem": problem, "mse": mse_model, "taskmet": tm_model,
                              "metric": metric, "history": hist})
        if bar is not None:
            bar.write(f"seed {seed}: test DQ  MSE {dq_mse:+.3f}   TaskMet {dq_tm:+.3f}")
    if bar is not None:
        bar.close()
    out["seconds"] = time.time() - t0
    return out


def summary(values) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0

"""The TaskMet trainer: the authors' schedule (inner Adam with warm start, 500 steps at the first
outer iteration then 100, gradient clipping 1.0, early stop on ||grad|| < 1e-3; outer Adam on
the metric through the implicit gradient of the inner fit), for the tasks in tasks.py."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .implicit import IMPLICIT_SOLVERS, implicit_argmin
from .metric import DiagonalMetricNet, mahalanobis_loss

__all__ = ["TaskMetConfig", "TaskMetTrainer"]


@dataclasses.dataclass
class TaskMetConfig:
    """The authors' schedule (their config/metric.yaml) with their cubic settings as defaults."""

    inner_lr: float = 0.1             # predictor Adam learning rate (authors: pred_lr per problem)
    inner_steps_init: int = 500       # inner Adam steps at the first outer iteration
    inner_steps: int = 100            # ... and at every later one (warm start)
    inner_clip: float = 1.0           # gradient-norm clipping of the inner steps
    inner_grad_tol: float = 1e-3      # inner early stop: ||grad|| < tol
    outer_lr: float = 1e-3            # metric Adam learning rate
    outer_steps: int = 100            # outer iterations
    outer_batch: Optional[int] = 50   # instances per outer step (None: all training instances)
    implicit_solver: str = "cg"       # "cg" | "normal_cg" | "exact"
    implicit_maxiter: Optional[int] = None
    implicit_rtol: float = 1e-6
    ridge: float = 1e-5
    val_every: int = 10               # outer iterations between validations (best model kept)
    mse_max_steps: int = 5000         # cap on the MSE baseline's Adam steps


def _clip_and_norm(params: Sequence[Tensor], max_norm: float) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return float(total * scale)


class TaskMetTrainer:
    """Learns a metric for the prediction loss of `predictor` so that its decisions on `task`
    improve (the outer problem), with the predictor refit on the Mahalanobis loss at every outer
    step (the inner problem) and the outer gradient taken through the inner argmin by
    implicit_argmin.

    `task` provides (see structloss_fast.taskmet.tasks): x_train, y_train, x_val, y_val;
    `samples(x, pred, y) -> (features, pred, target)` that flattens a batch of instances into
    the per-sample rows of the Mahalanobis loss; `task_loss(pred, y)` (differentiable, soft
    decisions); `decision_quality(pred, y)` (normalised, hard decisions).
    """

    def __init__(self, task, config: Optional[TaskMetConfig] = None, *, generator: Optional[torch.Generator] = None):
        self.task = task
        self.cfg = config or TaskMetConfig()
        if self.cfg.implicit_solver not in IMPLICIT_SOLVERS:
            raise ValueError(f"implicit_solver must be one of {IMPLICIT_SOLVERS}, got {self.cfg.implicit_solver!r}")
        self.gen = generator or torch.Generator().manual_seed(0)
        self.history: dict[str, list] = {}

    # -- inner problem
    def _inner_fit(self, predictor: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor],
                   steps: int) -> tuple[float, int]:
        params = [p for p in predictor.parameters() if p.requires_grad]
        loss_val, done = math.nan, 0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            gnorm = _clip_and_norm(params, self.cfg.inner_clip)
            opt.step()
            loss_val, done = float(loss.detach()), step + 1
            if gnorm < self.cfg.inner_grad_tol:
                break
        return loss_val, done

    def fit_mse(self, predictor: nn.Module) -> dict:
        """The two-stage baseline: the predictor fit on the plain MSE (Lambda = I) with the inner
        optimiser, to ||grad|| < inner_grad_tol (at most mse_max_steps)."""
        task = self.task
        opt = torch.optim.Adam(predictor.parameters(), lr=self.cfg.inner_lr)

        def loss_fn():
            _, pred, target = task.samples(task.x_train, predictor(task.x_train), task.y_train)
            return (pred - target).square().sum(dim=-1).mean()

        loss, steps = self._inner_fit(predictor, opt, loss_fn, self.cfg.mse_max_steps)
        return {"mse_loss": loss, "steps": steps}

    def inner_loss(self, predictor: nn.Module, metric: nn.Module):
        """inner(theta, *phi): the Mahalanobis loss on the training set, as a function of the
        predictor's and the metric's parameter tensors (torch.func.functional_call)."""
        task = self.task
        names_p = [n for n, _ in predictor.named_parameters()]
        names_m = [n for n, _ in metric.named_parameters()]

        def inner(theta, *phi):
            pred = torch.func.functional_call(predictor, dict(zip(names_p, theta)), (task.x_train,))
            feats, pr, tg = task.samples(task.x_train, pred, task.y_train)
            mod = _FunctionalMetric(metric, dict(zip(names_m, phi)))
            return mod.loss(feats, pr, tg)

        return inner

    def fit_taskmet(self, predictor: nn.Module, metric: nn.Module, *, progress=None) -> dict:
        """The TaskMet loop; returns the history and leaves predictor / metric at the best
        validation decision quality."""
        cfg, task = self.cfg, self.task
        inner_opt = torch.optim.Adam(predictor.parameters(), lr=cfg.inner_lr)
        outer_opt = torch.optim.Adam([p for p in metric.parameters() if p.requires_grad], lr=cfg.outer_lr)
        names_p = [n for n, _ in predictor.named_parameters()]
        phi = [p for p in metric.parameters()]
        inner = self.inner_loss(predictor, metric)
        hist = {"outer_loss": [], "inner_loss": [], "inner_steps": [], "val_dq": [], "cg_iterations": []}
        best = (-math.inf, None)
        n_train = task.x_train.shape[0]
        for it in range(cfg.outer_steps):
            # Inner problem with the current metric (fixed: its output is computed once).
            with torch.no_grad():
                feats, _, _ = task.samples(task.x_train, predictor(task.x_train), task.y_train)
                factor = metric(feats)
                eps = metric.identity_weight()
                eps = eps.detach() if isinstance(eps, Tensor) else eps
            diag = isinstance(metric, DiagonalMetricNet) or getattr(metric, "diagonal", False)

            def loss_fn():
                _, pr, tg = task.samples(task.x_train, predictor(task.x_train), task.y_train)
                return mahalanobis_loss(pr, tg, factor, eps=eps, diagonal=diag)

            steps = cfg.inner_steps_init if it == 0 else cfg.inner_steps
            inner_val, done = self._inner_fit(predictor, inner_opt, loss_fn, steps)

            # Outer step through the argmin.
            info: dict = {}
            theta = tuple(p.detach() for p in predictor.parameters())
            theta_star = implicit_argmin(inner, theta, *phi, solver=cfg.implicit_solver, ridge=cfg.ridge,
                                         rtol=cfg.implicit_rtol, maxiter=cfg.implicit_maxiter, info=info)
            if cfg.outer_batch is None or cfg.outer_batch >= n_train:
                idx = torch.arange(n_train)
            else:
                idx = torch.randperm(n_train, generator=self.gen)[: cfg.outer_batch]
            pred = torch.func.functional_call(predictor, dict(zip(names_p, theta_star)), (task.x_train[idx],))
            outer = task.task_loss(pred, task.y_train[idx])
            outer_opt.zero_grad(set_to_none=True)
            outer.backward()
            outer_opt.step()

            hist["outer_loss"].append(float(outer.detach()))
            hist["inner_loss"].append(inner_val)
            hist["inner_steps"].append(done)
            if "cg" in info:
                hist["cg_iterations"].append(int(info["cg"].iterations.max()))
            if it % cfg.val_every == 0 or it == cfg.outer_steps - 1:
                with torch.no_grad():
                    dq = float(task.decision_quality(predictor(task.x_val), task.y_val))
                hist["val_dq"].append((it, dq))
                if dq > best[0]:
                    best = (dq, (copy.deepcopy(predictor.state_dict()), copy.deepcopy(metric.state_dict())))
            if progress is not None:
                progress(it, hist)
        if best[1] is not None:
            predictor.load_state_dict(best[1][0])
            metric.load_state_dict(best[1][1])
        hist["best_val_dq"] = best[0]
        self.history = hist
        return hist


class _FunctionalMetric:
    """A metric module evaluated with substitute parameter tensors (for the implicit backward)."""

    def __init__(self, metric: nn.Module, params: dict):
        self.metric, self.params = metric, params

    def loss(self, feats, pred, target):
        if isinstance(self.metric, DiagonalMetricNet):
            factor = torch.func.functional_call(self.metric, self.params, (feats,))
            return mahalanobis_loss(pred, target, factor, eps=self.metric.eps, diagonal=True)
        factor = torch.func.functional_call(self.metric, self.params, (feats,))
        eps = self.params["log_identity"].exp() if "log_identity" in self.params else self.metric.identity_weight()
        return mahalanobis_loss(pred, target, factor, eps=eps, diagonal=getattr(self.metric, "diagonal", False))

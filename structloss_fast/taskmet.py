"""TaskMet: task-driven metric learning (Bansal, Chen, Mukadam, Amos, NeurIPS 2023; spec in
../shared/spec/taskmet.md).

- `mahalanobis_loss`: (f - y)^T Lambda (f - y) with Lambda = L L^T + eps I never formed.
- `MetricNet` (the authors' per-sample network) and `DiagonalMetricNet` (the cheap variant).
- `implicit_argmin` / `custom_argmin`: differentiate through an inner argmin by the implicit
  function theorem; the backward solves (H + ridge I) v = g with conjugate gradients over
  Hessian-vector products (structloss_fast.cg, matrix-free, no host synchronisation inside the
  solve), or the normal equations (the authors' torchopt setting), or exactly (Cholesky).
- `unrolled_argmin`: the baseline that backpropagates through gradient-descent steps.
- `TaskMetTrainer`: the authors' schedule (inner Adam with warm start, 500 steps at the first
  outer iteration then 100, gradient clipping 1.0, early stop on ||grad|| < 1e-3; outer Adam on
  the metric), for the tasks in structloss_fast.taskmet_tasks.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _validate
from .cg import CGResult, cg

__all__ = [
    "mahalanobis_loss", "MetricNet", "DiagonalMetricNet", "implicit_argmin", "custom_argmin", "unrolled_argmin",
    "TaskMetConfig", "TaskMetTrainer", "IMPLICIT_SOLVERS",
]

IMPLICIT_SOLVERS = ("cg", "normal_cg", "exact")

# ---------------------------------------------------------------- Mahalanobis loss


def mahalanobis_loss(
    pred: Tensor,
    target: Tensor,
    metric_factor: Tensor,
    *,
    eps: Union[float, Tensor] = 0.0,
    diagonal: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Mahalanobis prediction loss (pred - target)^T Lambda (pred - target) per sample, with
    Lambda = L L^T + eps I, computed as ||L^T (pred - target)||^2 + eps ||pred - target||^2:
    Lambda is never formed (memory B x r for the factor products, not B x n x n).

    Args:
        pred, target: (B, n) float tensors of one shape.
        metric_factor: the factor L: (B, n, r) per sample, (n, r) shared by all samples, or with
            diagonal=True the diagonal of L, (B, n) per sample or (n,) shared (Lambda = diag(L^2)).
        eps: >= 0, a float or a 0-dim tensor (e.g. the authors' learned identity weight).
        reduction: "mean" (over samples) | "sum" | "none" ((B,)).
    """
    _validate.tensor("pred", pred, ndim=2, floating=True)
    _validate.tensor("target", target, floating=True)
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {_validate._desc(target)}")
    _validate.tensor("metric_factor", metric_factor, floating=True)
    _validate.reduction(reduction)
    B, n = pred.shape
    if diagonal:
        if not (metric_factor.shape == (B, n) or metric_factor.shape == (n,)):
            raise ValueError(f"with diagonal=True, metric_factor must be (B, n) = {(B, n)} or (n,) = ({n},), "
                             f"got {_validate._desc(metric_factor)}")
    elif metric_factor.dim() == 3:
        if metric_factor.shape[:2] != (B, n):
            raise ValueError(f"a per-sample metric_factor must be (B, n, r) with (B, n) = {(B, n)}, "
                             f"got {_validate._desc(metric_factor)}")
    elif metric_factor.dim() == 2:
        if metric_factor.shape[0] != n:
            raise ValueError(f"a shared metric_factor must be (n, r) with n = {n}, got {_validate._desc(metric_factor)}")
    else:
        raise ValueError(f"metric_factor must be (B, n, r), (n, r), or with diagonal=True (B, n) / (n,), "
                         f"got {_validate._desc(metric_factor)}")
    if isinstance(eps, Tensor):
        if eps.dim() != 0:
            raise ValueError(f"eps must be a number or a 0-dim tensor, got {_validate._desc(eps)}")
    else:
        eps = _validate.number("eps", eps, lo=0.0)
    _validate.same_device(pred=pred, target=target, metric_factor=metric_factor,
                          eps=eps if isinstance(eps, Tensor) else None)

    d = pred - target
    if diagonal:
        per_sample = (metric_factor * d).square().sum(dim=-1)
    elif metric_factor.dim() == 3:
        per_sample = torch.einsum("bn,bnr->br", d, metric_factor).square().sum(dim=-1)
    else:
        per_sample = (d @ metric_factor).square().sum(dim=-1)
    if isinstance(eps, Tensor) or eps != 0.0:
        per_sample = per_sample + eps * d.square().sum(dim=-1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class MetricNet(nn.Module):
    """The authors' metric network: Linear(in_features, hidden) -> ReLU -> Linear(hidden, n * n),
    reshaped to a per-sample factor L (B, n, n); Lambda(x) = L L^T + exp(log_identity) I with a
    learned identity weight (initialised to 1). identity_init starts L near I (last layer's
    weights divided by identity_init_scale, bias = I), as in the authors' option."""

    def __init__(self, in_features: int, n: int, hidden: int = 200, *, identity_init: bool = False,
                 identity_init_scale: float = 100.0, learn_identity: bool = True):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n * n))
        if identity_init:
            with torch.no_grad():
                self.net[-1].weight.div_(identity_init_scale)
                self.net[-1].bias.copy_(torch.eye(n).reshape(-1))
        self.log_identity = nn.Parameter(torch.zeros(()), requires_grad=learn_identity)

    def forward(self, x: Tensor) -> Tensor:
        """The factor L (B, n, n) for features x (B, in_features)."""
        return self.net(x).view(x.shape[0], self.n, self.n)

    def identity_weight(self) -> Tensor:
        return self.log_identity.exp()

    def loss(self, x: Tensor, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return mahalanobis_loss(pred, target, self(x), eps=self.identity_weight(), reduction=reduction)

    def metric(self, x: Tensor) -> Tensor:
        """Lambda(x) (B, n, n), formed explicitly (for plots and tests)."""
        L = self(x)
        return L @ L.mT + self.identity_weight() * torch.eye(self.n, dtype=L.dtype, device=L.device)


class DiagonalMetricNet(nn.Module):
    """Diagonal metric: Linear -> ReLU -> Linear(hidden, n) -> softplus gives the diagonal l of
    the factor, Lambda(x) = diag(l^2) + eps I (eps fixed, default 0)."""

    def __init__(self, in_features: int, n: int, hidden: int = 200, *, eps: float = 0.0):
        super().__init__()
        self.n = n
        self.eps = _validate.number("eps", eps, lo=0.0)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.net(x))

    def identity_weight(self) -> float:
        return self.eps

    def loss(self, x: Tensor, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return mahalanobis_loss(pred, target, self(x), eps=self.eps, diagonal=True, reduction=reduction)

    def metric(self, x: Tensor) -> Tensor:
        return torch.diag_embed(self(x).square()) + self.eps * torch.eye(self.n, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------- implicit differentiation


@dataclasses.dataclass
class _ImplicitSpec:
    inner_loss: Callable
    n_theta: int
    single: bool
    solver: str
    ridge: float
    rtol: float
    atol: float
    maxiter: Optional[int]
    check_every: int
    backend: str
    info: Optional[dict]

    def pack(self, thetas):
        return thetas[0] if self.single else tuple(thetas)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _solve_hessian(spec: _ImplicitSpec, hvp: Callable[[Tensor], Tensor], rhs: Tensor) -> Tensor:
    """v = (H + ridge I)^{-1} rhs by the spec's solver; H is given by its products."""
    kw = dict(rtol=spec.rtol, atol=spec.atol, maxiter=spec.maxiter, check_every=spec.check_every, backend=spec.backend)
    if spec.solver == "cg":
        res = cg(hvp, rhs, ridge=spec.ridge, **kw)
    elif spec.solver == "normal_cg":
        # (H^T H + ridge I) v = H^T rhs, H symmetric: two products per iteration (torchopt's
        # solve_normal_cg, the authors' default).
        res = cg(lambda u: hvp(hvp(u)), hvp(rhs), ridge=spec.ridge, **kw)
    else:  # exact: H formed by N products, Cholesky (LU when H + ridge I is not positive definite)
        N = rhs.numel()
        eye = torch.eye(N, dtype=rhs.dtype, device=rhs.device)
        H = torch.stack([hvp(eye[i]) for i in range(N)], dim=1)
        H = 0.5 * (H + H.mT) + spec.ridge * eye
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:  # a synchronisation: "exact" is for tests and small problems
            v = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        else:
            v = torch.linalg.solve(H, rhs)
        res = None
        if spec.info is not None:
            spec.info["hessian"] = H.detach()
        return v
    if spec.info is not None:
        spec.info["cg"] = res
    return res.x


class _ImplicitArgmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _ImplicitSpec, *tensors):
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[: spec.n_theta])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_theta):
        spec: _ImplicitSpec = ctx.spec
        saved = ctx.saved_tensors
        thetas, params = saved[: spec.n_theta], saved[spec.n_theta:]
        need = ctx.needs_input_grad[1 + spec.n_theta:]
        none = (None,) * (1 + len(saved))
        if not any(need):
            return none
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_theta, thetas)]
        with torch.enable_grad():
            th = [t.detach().requires_grad_(True) for t in thetas]
            ps = [p.detach().requires_grad_(bool(nd)) for p, nd in zip(params, need)]
            loss = spec.inner_loss(spec.pack(th), *ps)
            g_th = torch.autograd.grad(loss, th, create_graph=True, allow_unused=True)
        connected = [i for i, g in enumerate(g_th) if g is not None and g.requires_grad]
        sizes = [t.numel() for t in th]

        def hvp(v: Tensor) -> Tensor:
            parts = list(torch.split(v, sizes))
            outs = torch.autograd.grad([g_th[i] for i in connected], th, grad_outputs=[parts[i].view_as(th[i]) for i in connected],
                                       retain_graph=True, allow_unused=True)
            return _flat([torch.zeros_like(t) if o is None else o for o, t in zip(outs, th)])

        rhs = _flat(grads).detach()
        v = _solve_hessian(spec, hvp, rhs) if connected else torch.zeros_like(rhs)
        vparts = list(torch.split(v, sizes))
        wanted = [p for p, nd in zip(ps, need) if nd]
        if connected and wanted:
            outs = torch.autograd.grad([g_th[i] for i in connected], wanted,
                                       grad_outputs=[-vparts[i].view_as(th[i]) for i in connected], allow_unused=True)
        else:
            outs = [None] * len(wanted)
        it = iter(outs)
        result = []
        for p, nd in zip(ps, need):
            if nd:
                o = next(it)
                result.append(torch.zeros_like(p) if o is None else o)
            else:
                result.append(None)
        return (None,) + (None,) * spec.n_theta + tuple(result)


def implicit_argmin(
    inner_loss: Callable,
    theta_star: Union[Tensor, Sequence[Tensor]],
    *params: Tensor,
    solver: str = "cg",
    ridge: float = 0.0,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    check_every: int = 10,
    backend: str = "auto",
    info: Optional[dict] = None,
):
    """Attach an inner solution to its parameters by the implicit function theorem.

    theta_star must be a (local) minimiser of inner_loss(theta, *params) in theta (a tensor or a
    sequence of tensors; whatever graph it carries is cut). The returned copy of theta_star
    (same structure) is differentiable in params with

        d theta* / d params = -(H + ridge I)^{-1} d^2 inner / d theta d params,

    applied in backward as one linear solve with g = dL/dtheta*: v = (H + ridge I)^{-1} g, then
    dL/dparams = -d/dparams <grad_theta inner, v>. H is never formed for solver="cg" (CG over
    Hessian-vector products by double backward: one product per iteration) or "normal_cg"
    ((H^2 + ridge I) v = H g: two products per iteration, the torchopt setting of the authors);
    "exact" forms H with N products and uses Cholesky (tests and small problems).

    rtol / atol / maxiter / check_every / backend go to structloss_fast.cg (maxiter default
    10 N). `info`, a dict, receives the CGResult of the last backward as info["cg"] (or the
    Hessian as info["hessian"] for "exact"). Double backward is not supported.
    """
    if solver not in IMPLICIT_SOLVERS:
        raise ValueError(f"solver must be one of {IMPLICIT_SOLVERS}, got {solver!r}")
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    single = isinstance(theta_star, Tensor)
    thetas = [theta_star] if single else list(theta_star)
    if not thetas:
        raise ValueError("theta_star must be a tensor or a non-empty sequence of tensors")
    for i, t in enumerate(thetas):
        _validate.tensor(f"theta_star[{i}]" if not single else "theta_star", t, floating=True)
    for i, p in enumerate(params):
        _validate.tensor(f"params[{i}]", p, floating=True)
    ridge = _validate.number("ridge", ridge, lo=0.0)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be None or a dict, got {type(info).__name__}")
    dtypes = {t.dtype for t in thetas}
    if len(dtypes) > 1:
        raise TypeError(f"theta_star's tensors must share one dtype, got {sorted(map(str, dtypes))}")
    # cg validates the remaining options; check them now rather than in the backward.
    _validate.number("rtol", rtol, lo=0.0)
    _validate.number("atol", atol, lo=0.0)
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0):
        raise ValueError(f"maxiter must be None or an int >= 0, got {maxiter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")

    detached = [t.detach() for t in thetas]
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        out = [t.clone() for t in detached]
        return out[0] if single else tuple(out)
    spec = _ImplicitSpec(inner_loss, len(thetas), single, solver, ridge, float(rtol), float(atol), maxiter,
                         check_every, backend, info)
    out = _ImplicitArgmin.apply(spec, *detached, *params)
    return out[0] if single else tuple(out)


def custom_argmin(inner_loss: Callable, **implicit_kwargs):
    """Decorator (jaxopt/torchopt custom_root style): `solve(*params) -> theta*` becomes
    differentiable in params by implicit_argmin; the solver itself runs on detached params and
    is never differentiated through."""

    def deco(solve: Callable):
        def wrapped(*params: Tensor):
            theta = solve(*[p.detach() for p in params])
            return implicit_argmin(inner_loss, theta, *params, **implicit_kwargs)

        wrapped.__name__ = getattr(solve, "__name__", "argmin")
        wrapped.__doc__ = solve.__doc__
        return wrapped

    return deco


def unrolled_argmin(inner_loss: Callable, theta0: Union[Tensor, Sequence[Tensor]], *params: Tensor, steps: int,
                    lr: float):
    """The baseline: `steps` gradient-descent steps on inner_loss from theta0, differentiable
    through every step (create_graph): memory grows linearly with steps."""
    single = isinstance(theta0, Tensor)
    th = [theta0] if single else list(theta0)
    th = [t.detach().requires_grad_(True) for t in th]
    for _ in range(steps):
        loss = inner_loss(th[0] if single else tuple(th), *params)
        gs = torch.autograd.grad(loss, th, create_graph=True)
        th = [t - lr * g for t, g in zip(th, gs)]
    return th[0] if single else tuple(th)


# ---------------------------------------------------------------- trainer


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

    `task` provides (see structloss_fast.taskmet_tasks): x_train, y_train, x_val, y_val;
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

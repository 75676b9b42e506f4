"""The paper's evaluation tasks for JEM (and any classifier): calibration (ECE with equal-width
confidence bins, reliability diagrams), out-of-distribution detection (AUROC with the three
scores), and robustness (PGD L-inf / L2 robust accuracy, optionally with SGLD refinement).

These are evaluation helpers, not ops: they run the model in eval mode under no_grad (except
where an input gradient is needed) and return tensors or Python floats.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .._train import eval_mode as _eval_mode

__all__ = [
    "predict_logits", "predict_probs", "accuracy", "calibration_bins", "expected_calibration_error",
    "reliability_diagram", "ood_scores", "auroc", "ood_auroc", "pgd_attack", "robust_accuracy", "OOD_SCORES",
]

OOD_SCORES = ("lse", "max_softmax", "grad_norm")


def _batches(n: int, batch_size: int):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Logits of x, in batches, eval mode, no grad."""
    _validate.tensor("x", x, floating=True)
    with _eval_mode(model), torch.no_grad():
        outs = [model(x[s]) for s in _batches(x.shape[0], batch_size)]
    return torch.cat(outs) if outs else x.new_empty((0, 0))


def predict_probs(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    return predict_logits(model, x, batch_size=batch_size).softmax(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    _validate.tensor("y", y, ndim=1, integer=True)
    _validate.length("y", y, x.shape[0], "x")
    logits = predict_logits(model, x, batch_size=batch_size)
    return (logits.argmax(1) == y.to(logits.device)).double().mean().item()


# ---------------------------------------------------------------- calibration


def _check_probs(probs: Tensor, labels: Tensor, n_bins: int) -> None:
    _validate.tensor("probs", probs, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, probs.shape[0], "probs")
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if probs.shape[1] < 1:
        raise ValueError(f"probs must have at least one class column, got shape {tuple(probs.shape)}")


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 20) -> dict:
    """Per-bin statistics over n_bins equal-width confidence bins (lo, hi] of (0, 1]:
    count (n_bins,), accuracy and mean confidence (float64; 0 in empty bins).
    Confidence = max probability, prediction = its argmax (the first on ties)."""
    _check_probs(probs, labels, n_bins)
    p = probs.detach().to(torch.float64)
    finite = torch.isfinite(p)
    if not bool(finite.all()):  # (an evaluation helper: reading the flag back is fine here)
        row = int((~finite).any(1).nonzero()[0, 0])
        raise ValueError(f"probs must be finite to be binned by confidence, got {int((~finite).sum())} non-finite "
                         f"value(s), first in row {row}: {p[row].tolist()[:8]}")
    conf, pred = p.max(1)
    correct = (pred == labels.to(p.device)).to(torch.float64)
    # bin m holds (m / M, (m + 1) / M]; a confidence of exactly 0 (impossible for probabilities
    # over >= 1 class unless all are 0) joins the first bin
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, torch.ones_like(conf))
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    safe = count.clamp_min(1)
    return {"count": count, "accuracy": acc_sum / safe, "confidence": conf_sum / safe,
            "edges": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)}


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 20) -> Tensor:
    """ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)| over n_bins equal-width bins (lo, hi]
    (the paper: 20 bins). probs (N, C) are class probabilities (e.g. softmax of the logits).
    Returns a 0-d float64 tensor (NaN for N = 0)."""
    bins = calibration_bins(probs, labels, n_bins)
    n = bins["count"].sum()
    return ((bins["count"] / n) * (bins["accuracy"] - bins["confidence"]).abs()).sum()


def reliability_diagram(probs: Tensor, labels: Tensor, path: Optional[str] = None, *, n_bins: int = 20,
                        title: Optional[str] = None, ax=None):
    """A reliability diagram (accuracy per confidence bin against the diagonal, ECE in the
    legend). Writes a PNG to `path` when given (matplotlib, Agg), or draws into `ax`.
    Returns the ECE (float)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration_bins(probs, labels, n_bins)
    ece = float(expected_calibration_error(probs, labels, n_bins))
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4, 4))
    width = 1.0 / n_bins
    centers = (bins["edges"][:-1] + width / 2).numpy()
    acc = bins["accuracy"].cpu().numpy()
    conf = bins["confidence"].cpu().numpy()
    empty = bins["count"].cpu().numpy() == 0
    acc[empty] = 0
    ax.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label=f"accuracy (ECE {100 * ece:.2f}%)")
    gap_bottom = [min(a, c) for a, c in zip(acc, conf)]
    gap = [abs(a - c) if not e else 0 for a, c, e in zip(acc, conf, empty)]
    ax.bar(centers, gap, bottom=gap_bottom, width=width, fill=False, hatch="///", edgecolor="tab:red",
           linewidth=0.0, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    if own:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        plt.close(fig)
    return ece


# ---------------------------------------------------------------- OOD detection


def ood_scores(model: nn.Module, x: Tensor, score: str = "lse", *, batch_size: int = 512) -> Tensor:
    """Per-sample in-distribution scores (higher = more in-distribution):
    "lse": LSE_y f(x)[y] (log p(x) up to a constant); "max_softmax": max_y p(y|x);
    "grad_norm": -||grad_x LSE_y f(x)[y]||_2."""
    _validate.tensor("x", x, floating=True)
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}, got {score!r}")
    out = []
    with _eval_mode(model):
        for s in _batches(x.shape[0], batch_size):
            xb = x[s]
            if score == "grad_norm":
                xb = xb.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    g, = torch.autograd.grad(model(xb).logsumexp(1).sum(), [xb])
                out.append(-g.flatten(1).norm(dim=1))
            else:
                with torch.no_grad():
                    logits = model(xb)
                out.append(logits.logsumexp(1) if score == "lse" else logits.softmax(1).max(1).values)
    return torch.cat(out) if out else x.new_empty((0,))


def auroc(scores_pos: Tensor, scores_neg: Tensor) -> Tensor:
    """Area under the ROC curve with `scores_pos` the positive class (in-distribution): the
    probability that a random positive scores above a random negative, ties counting 1/2
    (Mann-Whitney U / (n_pos n_neg), average ranks for ties). 0-d float64 tensor."""
    _validate.tensor("scores_pos", scores_pos, ndim=1, floating=True)
    _validate.tensor("scores_neg", scores_neg, ndim=1, floating=True)
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    s = torch.cat([scores_pos.detach(), scores_neg.detach()]).to(torch.float64)
    n_pos = scores_pos.numel()
    n_neg = scores_neg.numel()
    sorted_s, order = torch.sort(s, stable=True)
    # average rank (1-based) of each distinct value
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    rank_sum_pos = ranks[:n_pos].sum()
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def ood_auroc(model: nn.Module, x_in: Tensor, x_out: Tensor, *, scores: Sequence[str] = OOD_SCORES,
              batch_size: int = 512) -> dict:
    """AUROC of each score for in-distribution x_in (positive) against x_out."""
    return {name: float(auroc(ood_scores(model, x_in, name, batch_size=batch_size),
                              ood_scores(model, x_out, name, batch_size=batch_size))) for name in scores}


# ---------------------------------------------------------------- robustness


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", eps, n_iter: int = 40,
               step_size: Optional[float] = None, random_start: bool = True, clamp=(-1.0, 1.0),
               generator: Optional[torch.Generator] = None, objective=None, x_init: Optional[Tensor] = None) -> Tensor:
    """Projected gradient ascent on the cross-entropy (Madry et al.): L-inf (sign steps,
    projection onto the box) or L2 (normalised steps, projection onto the ball) of radius eps
    around x, inputs kept in `clamp` (None: unbounded). step_size defaults to 2.5 * eps / n_iter;
    random_start draws the start uniformly in the ball. Returns the adversarial inputs (detached).

    eps: a number; a list/tuple of E numbers (E attacks, one per radius, batched as one attack on
    x repeated E times; returns (E, *x.shape)); or a tensor of N per-example radii.
    objective: objective(logits, y) -> the scalar to maximise (default: the summed
    cross-entropy, y class indices); with an objective, y is any tensor with one row per example.
    x_init: the start instead of x (projected; random_start then adds nothing).
    The loop reads nothing back to the host."""
    _validate.tensor("x", x, floating=True)
    if objective is None:
        _validate.tensor("y", y, ndim=1, integer=True)
    else:
        _validate.tensor("y", y)
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
    _validate.length("y", y, x.shape[0], "x")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if x_init is not None:
        _validate.tensor("x_init", x_init, floating=True)
        if x_init.shape != x.shape:
            raise ValueError(f"x_init must have the shape of x {tuple(x.shape)}, got shape {tuple(x_init.shape)}")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if step_size is not None:
        step_size = _validate.number("step_size", step_size, lo=0.0)
    if isinstance(eps, (list, tuple)):
        radii = [_validate.number(f"eps[{i}]", e, lo=0.0) for i, e in enumerate(eps)]
        if not radii:
            raise ValueError("eps must hold at least one radius")
        E, N = len(radii), x.shape[0]

        def rep(t):
            return None if t is None else t.unsqueeze(0).expand(E, *t.shape).reshape(E * N, *t.shape[1:])

        per_example = torch.tensor(radii, dtype=x.dtype, device=x.device).repeat_interleave(N)
        x_adv = _pgd(model, rep(x), rep(y.to(x.device)), norm, _broadcast_radii(per_example, x.dim()), n_iter,
                     step_size, random_start, clamp, generator, objective, rep(x_init))
        return x_adv.view(E, *x.shape)
    if isinstance(eps, Tensor):
        _validate.tensor("eps", eps, ndim=1, floating=True)
        _validate.length("eps", eps, x.shape[0], "x")
        # read on CPU only (a CUDA read would synchronise; there a negative radius is the caller's)
        checkable = eps.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and not bool(((eps >= 0) & eps.isfinite()).all()):
            raise ValueError("eps must hold finite radii >= 0")
        eps = _broadcast_radii(eps.to(device=x.device, dtype=x.dtype), x.dim())
    else:
        eps = _validate.number("eps", eps, lo=0.0)
    return _pgd(model, x, y, norm, eps, n_iter, step_size, random_start, clamp, generator, objective, x_init)


def _broadcast_radii(eps: Tensor, ndim: int) -> Tensor:
    """(N,) radii as (N, 1, ..., 1), to broadcast against an input of ndim dimensions."""
    return eps.view(-1, *([1] * (ndim - 1)))


def _pgd(model, x, y, norm, eps, n_iter, step_size, random_start, clamp, generator, objective, x_init):
    """pgd_attack on validated arguments; eps a float or a broadcastable tensor of radii."""
    alpha = 2.5 * eps / max(n_iter, 1) if step_size is None else step_size
    lo, hi = (None, None) if clamp is None else clamp
    x = x.detach()
    y = y.to(x.device)
    if objective is None:
        objective = lambda logits, target: F.cross_entropy(logits, target, reduction="sum")  # noqa: E731

    def project(x_adv):
        delta = x_adv - x
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        out = x + delta
        return out if clamp is None else out.clamp(lo, hi)

    if x_init is not None:
        x_adv = project(x_init.detach().to(x.device, x.dtype))
    elif random_start and (isinstance(eps, Tensor) or eps > 0):
        # (uniform_ / normal_ on new tensors draw what torch.rand / torch.randn draw, and also take
        # the symbolic shapes of torch.compile(dynamic=True))
        if norm == "linf":
            start = (torch.empty_like(x).uniform_(generator=generator) * 2 - 1) * eps
        else:
            d = torch.empty_like(x).normal_(generator=generator)
            d = d / _per_sample_norm(d).clamp_min(1e-12)
            r = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).uniform_(generator=generator)
            start = d * r.pow(1.0 / max(math.prod(x.shape[1:]), 1)) * eps  # (x[0] fails on an empty batch)
        x_adv = project(x + start)
    else:
        x_adv = x.clone()
    with _eval_mode(model):
        for _ in range(n_iter):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = objective(model(x_adv), y)
                g, = torch.autograd.grad(loss, [x_adv])
            with torch.no_grad():
                if norm == "linf":
                    x_adv = x_adv + alpha * g.sign()
                else:
                    x_adv = x_adv + alpha * g / _per_sample_norm(g).clamp_min(1e-12)
                x_adv = project(x_adv)
    return x_adv.detach()


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", eps: float, n_iter: int = 40,
                    step_size: Optional[float] = None, random_start: bool = True, clamp=(-1.0, 1.0),
                    sgld_steps: int = 0, sgld: Optional[dict] = None, batch_size: int = 256,
                    generator: Optional[torch.Generator] = None) -> float:
    """Accuracy under a PGD attack (pgd_attack). With sgld_steps > 0, the adversarial inputs are
    refined by that many SGLD steps on log p(x) (SGLDSampler, short-run from the attacked
    input; `sgld`: its keyword arguments, e.g. dict(step_size=1.0, noise_std=0.01)) before they
    are classified, as the paper's defence. The attack does not differentiate through the
    refinement (no adaptive/BPDA attack): it attacks the classifier alone."""
    _validate.tensor("y", y, ndim=1, integer=True)
    _validate.length("y", y, x.shape[0], "x")
    if not isinstance(sgld_steps, int) or sgld_steps < 0:
        raise ValueError(f"sgld_steps must be a non-negative int, got {sgld_steps!r}")
    sampler = None
    if sgld_steps > 0:
        from .training import SGLDSampler

        sampler = SGLDSampler(model, None, n_steps=sgld_steps, **(sgld or {}))
    correct = 0
    for s in _batches(x.shape[0], batch_size):
        x_adv = pgd_attack(model, x[s], y[s], norm=norm, eps=eps, n_iter=n_iter, step_size=step_size,
                           random_start=random_start, clamp=clamp, generator=generator)
        if sampler is not None:
            x_adv = sampler.run_chain(x_adv)
        with _eval_mode(model), torch.no_grad():
            correct += (model(x_adv).argmax(1) == y[s].to(x_adv.device)).sum().item()
    return correct / max(x.shape[0], 1)

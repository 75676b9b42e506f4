"""Pairwise metric-learning losses on the fused engine (../shared/spec/pairwise.md).

Each loss takes embeddings (B, D) and integer labels (B,), optionally a separate reference
set (ref_embeddings (M, D), ref_labels (M,)); without references, every other row of the
batch is a reference and self-pairs are excluded. Semantics and defaults are those of
pytorch-metric-learning (CosineSimilarity, AvgNonZeroReducer for "mean"), so the modules are
drop-in replacements for its classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ext, _validate
from .ops import pairwise as _ops
from .reference import pairwise as _ref

__all__ = ["circle_loss", "unified_loss", "CircleLoss", "UnifiedLoss"]


def _check_inputs(embeddings, labels, ref_embeddings, ref_labels):
    _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=1, integer=True)
    _validate.length("labels", labels, embeddings.shape[0], "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        _validate.tensor("ref_embeddings", ref_embeddings, ndim=2, floating=True)
        _validate.tensor("ref_labels", ref_labels, ndim=1, integer=True)
        _validate.length("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_embeddings must have the embedding size of embeddings ({embeddings.shape[1]}), "
                f"got shape {tuple(ref_embeddings.shape)}"
            )
    _validate.same_device(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels)


def _gpu_supported(backend: str, x: Tensor) -> None:
    if backend == "triton":
        from .triton import pairwise as tk

        why = tk.check_supported(x)
        if why is not None:
            raise _ext.BackendUnavailable(f"backend='triton': {why}")


def _run(name, loss_id, params, reference_fn, embeddings, labels, ref_embeddings, ref_labels, reduction, backend):
    _check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    _validate.reduction(reduction)
    chosen = _ext.resolve_backend(backend, embeddings.device, "pairwise_loss")
    if chosen == "auto_triton_unsupported":  # pragma: no cover
        chosen = "cuda"
    if chosen == "triton" and backend == "auto":
        from .triton import pairwise as tk

        if tk.check_supported(embeddings) is not None:
            chosen = "cuda" if _ext.backend_status("cuda", embeddings.device, "pairwise_loss")[0] else "reference"
    _gpu_supported(chosen, embeddings)
    if chosen == "reference":
        return reference_fn(
            embeddings, labels, *params, ref_embeddings=ref_embeddings, ref_labels=ref_labels, reduction=reduction
        )

    out_dtype = embeddings.dtype
    # The compiled kernels compute in float32 (float64 for float64 input); Triton reads
    # fp16/bf16 tiles directly and accumulates in float32.
    low_precision = embeddings.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if low_precision else embeddings.dtype
    x = F.normalize(embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12)
    exclude_self = ref_embeddings is None
    if exclude_self:
        ref, ref_lab = x, labels
    else:
        ref = F.normalize(ref_embeddings.to(compute_dtype), p=2, dim=1, eps=1e-12)
        ref_lab = ref_labels
    if chosen == "triton" and low_precision:
        x = x.to(embeddings.dtype)
        ref = x if exclude_self else ref.to(embeddings.dtype)
    labels64 = labels.to(torch.int64).contiguous()
    ref_lab64 = labels64 if exclude_self else ref_lab.to(torch.int64).contiguous()
    compute_grad = (
        reduction != "none"
        and torch.is_grad_enabled()
        and (embeddings.requires_grad or (ref_embeddings is not None and ref_embeddings.requires_grad))
    )
    out = _ops.pairwise_loss(
        chosen, x, labels64, ref, ref_lab64, exclude_self, loss_id, params,
        _ops.REDUCTION_IDS[reduction], compute_grad,
    )[0]
    return out.to(out_dtype)


def circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Circle loss with pair-level labels (Sun et al., CVPR 2020), as pytorch-metric-learning's
    CircleLoss: cosine similarities, alphas detached, rows without a positive or a negative
    give 0, "mean" averages the non-zero row losses.

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64; normalized inside.
        labels: (B,) integer class labels.
        m: relaxation margin in [0, 1). gamma: scale > 0.
        ref_embeddings, ref_labels: optional (M, D) / (M,) references (e.g. a memory queue);
            they receive gradient if they require it.
        reduction: "mean" | "sum" | "none" (per anchor, shape (B,)).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".
    """
    m = _validate.number("m", m, lo=0.0, hi=1.0, hi_open=True)
    gamma = _validate.number("gamma", gamma, lo=0.0, lo_open=True)
    return _run("circle_loss", _ops.LOSS_IDS["circle"], (m, gamma), _ref.circle_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend)


def unified_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    m: float = 0.35,
    gamma: float = 64.0,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The Circle paper's unified loss (Eq. 1), pair-level:
    softplus(LSE_N gamma (s_n + m) + LSE_P (-gamma s_p)); same reduction as circle_loss.
    Its class-level form is AM-Softmax/CosFace, whose defaults (m = 0.35, gamma = 64) it takes."""
    m = _validate.number("m", m, lo=0.0, hi=1.0, hi_open=True)
    gamma = _validate.number("gamma", gamma, lo=0.0, lo_open=True)
    return _run("unified_loss", _ops.LOSS_IDS["unified"], (m, gamma), _ref.unified_loss, embeddings, labels,
                ref_embeddings, ref_labels, reduction, backend)


class _PairwiseModule(nn.Module):
    """Called as loss_fn(embeddings, labels) like pytorch-metric-learning's losses."""

    _fn = None

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None:
            raise NotImplementedError(
                f"{type(self).__name__} computes all pairs; miners (indices_tuple) are not supported"
            )
        return type(self)._fn(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels, **self._kwargs())


class CircleLoss(_PairwiseModule):
    _fn = staticmethod(circle_loss)

    def __init__(self, m: float = 0.4, gamma: float = 80.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.m, self.gamma, self.reduction, self.backend = m, gamma, reduction, backend

    def _kwargs(self):
        return dict(m=self.m, gamma=self.gamma, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"m={self.m}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"


class UnifiedLoss(_PairwiseModule):
    _fn = staticmethod(unified_loss)

    def __init__(self, m: float = 0.35, gamma: float = 64.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.m, self.gamma, self.reduction, self.backend = m, gamma, reduction, backend

    def _kwargs(self):
        return dict(m=self.m, gamma=self.gamma, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"m={self.m}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"

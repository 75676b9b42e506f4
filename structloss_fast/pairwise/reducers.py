"""Reducers of the pairwise losses, with pytorch-metric-learning's (PML) semantics.

`reducer=` of every pairwise loss takes one of these, or PML's own reducer object of the same
class. A loss is a dict of sub-losses (PML's loss_dict: each with its per-element losses, their
indices and a reduction type: "element" one per anchor, "pos_pair" / "neg_pair" one per pair,
"triplet" one per triplet, "already_reduced"); the reducer turns each into a number and the
sub-losses are added. Every reducer is plain PyTorch over the elements, so the gradient of any
reduction is exact (autograd hands the fused kernels the per-anchor weights).

The fused engine never lists pairs: it returns, per anchor, the sum of its pair (triplet) losses,
their number and how many are non-zero. `reduce_summary` reduces those where that suffices (every
reducer on per-anchor losses; mean, sum, non-zero average, class weights and per-anchor means on
pair losses); the others (a threshold other than 0 on pair losses, DoNothingReducer) need the
elements, which the pair-list path lists (structloss_fast/pairwise/tuples.py).

One deliberate difference from PML: the threshold reducers keep a NaN loss (PML's `loss > low`
drops it), so that a non-finite input gives a non-finite loss.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["BaseReducer", "MeanReducer", "SumReducer", "ThresholdReducer", "AvgNonZeroReducer", "PerAnchorReducer",
           "ClassWeightedReducer", "DivisorReducer", "DoNothingReducer", "MultipleReducers", "as_reducer"]


class Elements(NamedTuple):
    """A sub-loss as PML lists it."""

    losses: Tensor        # (K,) per element
    indices: object       # (K,) anchors ("element"), (anchors, others) pairs, (a, p, n) triplets
    reduction_type: str
    divisor: object = None


class Summary(NamedTuple):
    """A pair or triplet sub-loss as the fused engine returns it, per anchor."""

    sums: Tensor          # (B,) sum of the anchor's element losses (with gradient)
    count: Tensor         # (B,) its number of elements
    nonzero: Tensor | None  # (B,) of which > 0 (or NaN); None where the engine does not count them
    reduction_type: str


def zero_loss(embeddings: Tensor) -> Tensor:
    """PML's zero: connected to the embeddings (and NaN for a non-finite input, as PML's)."""
    return (embeddings * 0).sum()


def _anchors(indices, reduction_type):
    return indices if reduction_type == "element" else indices[0]


def _mean_or_zero(total: Tensor, n: Tensor, embeddings: Tensor) -> Tensor:
    n = n.to(total.dtype)
    return torch.where(n > 0, total / n.clamp_min(1), zero_loss(embeddings).to(total.dtype))


class BaseReducer(nn.Module):
    """forward(loss_dict, embeddings, labels) as PML's reducers; `reduce_elements` and
    `reduce_summary` are what the losses call."""

    def forward(self, loss_dict: dict, embeddings: Tensor, labels: Tensor):
        if len(loss_dict) != 1:
            raise ValueError(f"{type(self).__name__} reduces one sub-loss; use MultipleReducers for several")
        (info,) = loss_dict.values()
        losses = info["losses"]
        if not torch.is_tensor(losses):
            return zero_loss(embeddings) if losses == 0 else torch.as_tensor(losses)
        return self.reduce_elements(Elements(losses, info["indices"], info["reduction_type"], info.get("divisor")),
                                    embeddings, labels)

    def reduce_elements(self, e: Elements, embeddings: Tensor, labels: Tensor) -> Tensor:
        if e.reduction_type == "already_reduced":
            return e.losses
        if e.losses.numel() == 0:
            return zero_loss(embeddings)
        return self._elements(e, embeddings, labels)

    def _elements(self, e: Elements, embeddings, labels) -> Tensor:
        raise NotImplementedError

    def reduce_summary(self, s: Summary, embeddings: Tensor, labels: Tensor) -> Tensor | None:
        """The reduction from per-anchor sums and counts, or None when it needs the elements."""
        return None


class MeanReducer(BaseReducer):
    def _elements(self, e, embeddings, labels):
        return e.losses.mean()

    def reduce_summary(self, s, embeddings, labels):
        return _mean_or_zero(s.sums.sum(), s.count.sum(), embeddings)


class SumReducer(BaseReducer):
    def _elements(self, e, embeddings, labels):
        return e.losses.sum()

    def reduce_summary(self, s, embeddings, labels):
        return s.sums.sum()


class ThresholdReducer(BaseReducer):
    """The mean of the losses in (low, high) (either bound may be None); 0 when none is."""

    def __init__(self, low: float | None = None, high: float | None = None):
        super().__init__()
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs low or high (or both)")
        for name, v in (("low", low), ("high", high)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{name} must be a number or None, got {type(v).__name__}")
        self.low, self.high = low, high

    def _keep(self, losses: Tensor) -> Tensor:
        nan = losses.isnan()
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            keep &= (losses > self.low) | nan
        if self.high is not None:
            keep &= (losses < self.high) | nan
        return keep

    def _elements(self, e, embeddings, labels):
        keep = self._keep(e.losses)
        total = torch.where(keep, e.losses, torch.zeros_like(e.losses)).sum()
        return _mean_or_zero(total, keep.sum(), embeddings)

    def reduce_summary(self, s, embeddings, labels):
        if self.low == 0 and self.high is None:  # pair losses are >= 0: the non-zero average
            return _mean_or_zero(s.sums.sum(), s.nonzero.sum(), embeddings)
        return None

    def extra_repr(self):
        return f"low={self.low}, high={self.high}"


class AvgNonZeroReducer(ThresholdReducer):
    def __init__(self):
        super().__init__(low=0)


class ClassWeightedReducer(BaseReducer):
    """mean(loss * weights[label of the element's anchor])."""

    def __init__(self, weights):
        super().__init__()
        self.weights = torch.as_tensor(weights)

    def _w(self, labels, like):
        if labels is None:
            raise ValueError("ClassWeightedReducer needs labels")
        return self.weights.to(device=like.device, dtype=like.dtype)[labels]

    def _elements(self, e, embeddings, labels):
        return (e.losses * self._w(labels[_anchors(e.indices, e.reduction_type)], e.losses)).mean()

    def reduce_summary(self, s, embeddings, labels):
        return _mean_or_zero((s.sums * self._w(labels, s.sums)).sum(), s.count.sum(), embeddings)


def _pml_default_aggregation(fn) -> bool:
    return getattr(fn, "__name__", "") == "aggregation_func" and \
        getattr(fn, "__module__", "").startswith("pytorch_metric_learning")


class PerAnchorReducer(BaseReducer):
    """Per anchor, the mean of its pair losses (0 without pairs); then `reducer` (MeanReducer by
    default) over the anchors. Per-anchor losses go to `reducer` directly; triplets are not
    supported (as PML)."""

    def __init__(self, reducer: BaseReducer | None = None, aggregation_func: Callable | None = None):
        super().__init__()
        if aggregation_func is not None and not _pml_default_aggregation(aggregation_func):
            raise NotImplementedError("PerAnchorReducer: only the default aggregation (the mean of each anchor's "
                                      "pair losses) is supported; a custom aggregation_func needs PML's B x B array")
        self.reducer = as_reducer(reducer) if reducer is not None else MeanReducer()

    def _per_anchor(self, per_anchor: Tensor, embeddings, labels):
        idx = torch.arange(per_anchor.shape[0], device=per_anchor.device)
        return self.reducer.reduce_elements(Elements(per_anchor, idx, "element"), embeddings, labels)

    def _elements(self, e, embeddings, labels):
        if e.reduction_type == "triplet":
            raise NotImplementedError("PerAnchorReducer: triplet reduction is not supported (as in PML)")
        if e.reduction_type == "element":
            return self.reducer.reduce_elements(e, embeddings, labels)
        B = embeddings.shape[0]
        anchors = e.indices[0]
        sums = e.losses.new_zeros(B).index_add(0, anchors, e.losses)
        count = torch.zeros(B, device=anchors.device, dtype=torch.long).index_add(0, anchors, torch.ones_like(anchors))
        return self._per_anchor(torch.where(count > 0, sums / count.clamp_min(1), torch.zeros_like(sums)),
                                embeddings, labels)

    def reduce_summary(self, s, embeddings, labels):
        if s.reduction_type == "triplet":
            raise NotImplementedError("PerAnchorReducer: triplet reduction is not supported (as in PML)")
        count = s.count.to(s.sums.dtype)
        return self._per_anchor(torch.where(count > 0, s.sums / count.clamp_min(1), torch.zeros_like(s.sums)),
                                embeddings, labels)


class DivisorReducer(BaseReducer):
    """sum(losses) / the divisor the loss supplies (PML: MarginLoss, ProxyAnchorLoss)."""

    def _elements(self, e, embeddings, labels):
        if e.divisor is None:
            raise ValueError("DivisorReducer needs a loss that supplies a divisor (as PML's MarginLoss and "
                             "ProxyAnchorLoss do); this loss does not")
        divisor = torch.as_tensor(e.divisor, device=e.losses.device)
        return torch.where(divisor != 0, e.losses.sum() / divisor, zero_loss(embeddings))

    def reduce_summary(self, s, embeddings, labels):
        raise ValueError("DivisorReducer needs a loss that supplies a divisor (as PML's MarginLoss and "
                         "ProxyAnchorLoss do); this loss does not")


class DoNothingReducer(BaseReducer):
    """Returns PML's loss dict unreduced."""

    def forward(self, loss_dict, embeddings, labels):
        return loss_dict


class MultipleReducers(BaseReducer):
    """One reducer per sub-loss name (`default_reducer`, MeanReducer by default, for the others);
    the sub-losses are added."""

    def __init__(self, reducers: dict, default_reducer: BaseReducer | None = None):
        super().__init__()
        self.reducers = nn.ModuleDict({k: as_reducer(v) for k, v in reducers.items()})
        self.default_reducer = as_reducer(default_reducer) if default_reducer is not None else MeanReducer()

    def for_sub_loss(self, name: str) -> BaseReducer:
        return self.reducers[name] if name in self.reducers else self.default_reducer


def for_sub_loss(reducer: BaseReducer, name: str) -> BaseReducer:
    """The reducer of one sub-loss: PML copies a single reducer to every sub-loss."""
    return reducer.for_sub_loss(name) if isinstance(reducer, MultipleReducers) else reducer


_SIMPLE = {"MeanReducer": MeanReducer, "SumReducer": SumReducer, "AvgNonZeroReducer": AvgNonZeroReducer,
           "DoNothingReducer": DoNothingReducer, "DivisorReducer": DivisorReducer}
DEFAULTS = {"mean": MeanReducer, "avg_non_zero": AvgNonZeroReducer, "divisor": DivisorReducer}


def as_reducer(obj, name: str = "reducer") -> BaseReducer | None:
    """Ours as is; PML's reducer objects (the classes above) converted with their settings."""
    if obj is None or isinstance(obj, BaseReducer):
        return obj
    names = [k.__name__ for k in type(obj).__mro__ if k.__module__.startswith("pytorch_metric_learning")]
    if names:
        kind = names[0]
        if kind in _SIMPLE:
            return _SIMPLE[kind]()
        if kind == "ThresholdReducer":
            return ThresholdReducer(obj.low, obj.high)
        if kind == "ClassWeightedReducer":
            return ClassWeightedReducer(copy.deepcopy(obj.weights))
        if kind == "PerAnchorReducer":
            return PerAnchorReducer(obj.reducer, obj.aggregation_func)
        if kind == "MultipleReducers":
            return MultipleReducers(dict(obj.reducers.items()), obj.default_reducer)
    raise TypeError(f"{name} must be a structloss_fast.pairwise reducer or pytorch-metric-learning's "
                    f"(MeanReducer, SumReducer, AvgNonZeroReducer, ThresholdReducer, PerAnchorReducer, "
                    f"ClassWeightedReducer, DivisorReducer, DoNothingReducer, MultipleReducers), got {type(obj).__name__}")

"""Distances of the pairwise losses and miners, with pytorch-metric-learning's (PML) semantics.

`distance=` of every pairwise loss and miner takes one of these, or PML's own objects of the
same classes (CosineSimilarity, DotProductSimilarity, LpDistance), which are read by their
attributes. Each is an nn.Module returning the dense (B, M) matrix when called, as PML's:

    CosineSimilarity()                              x^ . r^                  (a similarity)
    DotProductSimilarity(normalize_embeddings=True) x . r, ** power          (a similarity)
    LpDistance(normalize_embeddings=True, p=2, power=1)   ||x - r||_p ** power (a distance)

with x^ = F.normalize(x, p) when normalize_embeddings. A similarity is "inverted" (larger is
closer): the losses turn a distance into their own orientation exactly as PML's
`distance.margin()` does (docs/spec/pairwise.md, "Distances"). The fused engine computes
dot-product similarities (power 1) and p = 2 distances (any power); the others run on the pair
lists in plain PyTorch (structloss_fast/pairwise/tuples.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BaseDistance", "CosineSimilarity", "DotProductSimilarity", "LpDistance", "as_distance"]


class DistanceSpec(NamedTuple):
    """What the loss code needs to know of a distance (hashable; compared for miner fusion)."""

    inverted: bool     # a similarity
    normalize: bool    # rows are F.normalize'd (with p) first
    p: float
    power: float

    @property
    def engine(self) -> bool:
        """Whether the fused engine computes it (GEMM similarities, or p = 2 distances)."""
        if not self.inverted:
            return self.p == 2
        return self.power == 1 and (self.p == 2 or not self.normalize)


class BaseDistance(nn.Module):
    is_inverted = False

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1):
        super().__init__()
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(f"normalize_embeddings must be a bool, got {type(normalize_embeddings).__name__}")
        for name, v in (("p", p), ("power", power)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        self.normalize_embeddings, self.p, self.power = normalize_embeddings, float(p), float(power)

    def spec(self) -> DistanceSpec:
        return DistanceSpec(self.is_inverted, self.normalize_embeddings, self.p, self.power)

    def maybe_normalize(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=self.p, dim=1) if self.normalize_embeddings else x

    def compute_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        """The (B, M) matrix of PML's distance (ref_emb defaults to query_emb)."""
        q = self.maybe_normalize(query_emb)
        r = q if ref_emb is None else self.maybe_normalize(ref_emb)
        mat = self.compute_mat(q, r)
        return mat if self.power == 1 else mat ** self.power

    def margin(self, x, y):
        """PML's margin: how far x is from y in the "closer is larger" sense of the losses."""
        return y - x if self.is_inverted else x - y

    def extra_repr(self):
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p:g}, power={self.power:g}"


class DotProductSimilarity(BaseDistance):
    is_inverted = True

    def compute_mat(self, query, ref):
        return query @ ref.T


class CosineSimilarity(DotProductSimilarity):
    def __init__(self, **kwargs):
        if kwargs.pop("normalize_embeddings", True) is not True:
            raise ValueError("CosineSimilarity normalizes the embeddings (use DotProductSimilarity otherwise)")
        super().__init__(normalize_embeddings=True, **kwargs)


class LpDistance(BaseDistance):
    is_inverted = False

    def compute_mat(self, query, ref):
        return torch.cdist(query, ref, p=self.p)


# PML class names (and their bases) that map onto ours, by the name of the class or of a base.
_PML_KINDS = {"CosineSimilarity": CosineSimilarity, "DotProductSimilarity": DotProductSimilarity,
              "LpDistance": LpDistance}


def as_distance(obj, name: str = "distance") -> BaseDistance | None:
    """Ours as is; PML's CosineSimilarity / DotProductSimilarity / LpDistance (or subclasses that
    keep their compute_mat) as ours with the same p, power and normalize_embeddings; None stays
    None (the loss's default)."""
    if obj is None or isinstance(obj, BaseDistance):
        return obj
    for klass in type(obj).__mro__:
        if klass.__name__ in _PML_KINDS and klass.__module__.startswith("pytorch_metric_learning"):
            if type(obj).compute_mat is not klass.compute_mat:
                break  # a subclass with its own matrix: not ours to reproduce
            ours = _PML_KINDS[klass.__name__]
            kw = dict(p=obj.p, power=obj.power)
            if ours is not CosineSimilarity:
                kw["normalize_embeddings"] = bool(obj.normalize_embeddings)
            return ours(**kw)
    raise TypeError(
        f"{name} must be a structloss_fast.pairwise distance (CosineSimilarity, DotProductSimilarity, LpDistance) or "
        f"pytorch-metric-learning's object of one of those classes, got {type(obj).__name__}"
    )

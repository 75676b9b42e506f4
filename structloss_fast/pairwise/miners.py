"""Miners with pytorch-metric-learning's (PML) semantics and index tuples, that never build the
B x M distance matrix, and that fuse into their loss's pass.

    miner = MultiSimilarityMiner(epsilon=0.1)
    loss = MultiSimilarityLoss()(emb, labels, miner(emb, labels))   # PML's loop, unchanged

A miner's call returns a MinedTuple: PML's tuple ((a1, p, a2, n) pairs or (a, p, n) triplets,
int64), worked out on first use (len() excepted) in strips of rows, each strip's distances
formed, mined and dropped (O(strip x M) memory). When the tuple goes, unused, to the loss it was
mined for (same embeddings, labels and references, same distance) and the CPU engine fuses that
pair (MultiSimilarityMiner with Circle / multi-similarity / contrastive, PairMarginMiner with
the same, TripletMarginMiner with TripletMarginLoss, BatchHardMiner and BatchEasyHardMiner
without "all" or ranges with TripletMarginLoss), the loss applies the miner's rule inside its
own pass: one distance computation, no index lists. Otherwise the loss reads the listed pairs
(structloss_fast/pairwise/tuples.py).

The tuples equal PML's as sets; within an anchor they are ordered by reference index (PML orders
multi-similarity's by distance). Miners run without gradient, as PML's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _validate
from .._ids import PairMiner, PairPick
from .distances import CosineSimilarity, LpDistance, as_distance

__all__ = ["BaseMiner", "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "BatchEasyHardMiner",
           "BatchHardMiner", "MinedTuple"]

# Distance matrix entries per strip (as the engine's CPU strips).
STRIP_ELEMS = 1 << 22


class MinedTuple(Sequence):
    """A miner's result: PML's index tuple, computed on first use. Kept with it: what was mined,
    so that the loss it was mined for can fuse the miner instead (BaseMiner.fused)."""

    def __init__(self, miner: "BaseMiner", embeddings, labels, ref_emb, ref_labels, self_index: int | None = None):
        self.miner = miner
        self.embeddings, self.labels, self.ref_emb, self.ref_labels = embeddings, labels, ref_emb, ref_labels
        self.self_index = self_index
        self._value = None

    @property
    def materialized(self) -> bool:
        return self._value is not None

    def without_self(self, self_index: int) -> "MinedTuple":
        """The tuple without the pairs of an anchor with its own reference slot
        (self_index + anchor) mod M: PML's CrossBatchMemory's remove_self_comparisons."""
        return MinedTuple(self.miner, self.embeddings, self.labels, self.ref_emb, self.ref_labels, self_index)

    def value(self) -> tuple[Tensor, ...]:
        if self._value is None:
            with torch.no_grad():
                t = self.miner.mine(self.embeddings.detach(), self.labels,
                                    None if self.ref_emb is None else self.ref_emb.detach(), self.ref_labels)
            self._value = t if self.self_index is None else remove_self_pairs(t, self.self_index,
                                                                              self.ref_emb.shape[0])
        return self._value

    def __len__(self):
        return self.miner.tuple_size

    def __getitem__(self, k):
        return self.value()[k]

    def __iter__(self):
        return iter(self.value())

    def __repr__(self):
        what = "materialized" if self.materialized else "not yet computed"
        return f"MinedTuple({type(self.miner).__name__}, {self.miner.tuple_size} tensors, {what})"


def remove_self_pairs(t: tuple, self_index: int, M: int) -> tuple:
    """Drops the positive pairs (triplets) whose positive is the anchor's own slot
    (self_index + a) mod M."""
    a, p = t[0], t[1]
    keep = p != (self_index + a) % max(M, 1)
    if len(t) == 3:
        return tuple(x[keep] for x in t)
    return a[keep], p[keep], t[2], t[3]


class BaseMiner(nn.Module):
    tuple_size = 4
    _default_distance = LpDistance

    def __init__(self, distance=None):
        super().__init__()
        self.distance = as_distance(distance) if distance is not None else self._default_distance()

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> MinedTuple:
        from .losses import check_inputs  # (losses imports this module)

        if labels is None:
            raise ValueError("miners need labels")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        check_inputs(embeddings, labels, ref_emb, ref_labels)
        return MinedTuple(self, embeddings, labels, ref_emb, ref_labels)

    # ---- mining in strips of anchors

    def mine(self, x: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None) -> tuple[Tensor, ...]:
        parts = [[] for _ in range(self.tuple_size)]
        for row0, d, pos, neg in self._strips(x, labels, ref, ref_labels):
            for k, t in enumerate(self._mine_strip(d, pos, neg)):
                parts[k].append(t + (row0 if k in self._anchor_slots else 0))
        out = tuple(torch.cat(p) if p else torch.empty(0, dtype=torch.long, device=x.device) for p in parts)
        return self._finish(out, labels, ref_labels)

    @property
    def _anchor_slots(self):
        return (0,) if self.tuple_size == 3 else (0, 2)

    def _strips(self, x, labels, ref, ref_labels):
        """(row0, distances (t, M) as PML's distance computes them, positives, negatives)."""
        own = ref is None
        ref, ref_labels = (x, labels) if own else (ref, ref_labels)
        xs = self.distance.maybe_normalize(x)
        rs = xs if own else self.distance.maybe_normalize(ref)
        M = ref.shape[0]
        T = max(1, min(x.shape[0], STRIP_ELEMS // max(M, 1)))
        for row0 in range(0, x.shape[0], T):
            q = xs[row0:row0 + T]
            d = self.distance.compute_mat(q, rs)
            if self.distance.power != 1:
                d = d ** self.distance.power
            same = labels[row0:row0 + T, None] == ref_labels[None, :]
            pos = same.clone()
            if own:  # PML removes the diagonal only when the references are the embeddings
                rows = torch.arange(q.shape[0], device=x.device)
                pos[rows, rows + row0] = False
            yield row0, d, pos, ~same

    def _mine_strip(self, d, pos, neg):
        raise NotImplementedError

    def _finish(self, out, labels, ref_labels):
        return out

    # ---- fusion

    def fused(self, loss_name: str) -> tuple[str, int, tuple] | None:
        """(engine loss, PairMiner, miner parameters oriented as a similarity) when this miner fuses
        into `loss_name`'s pass, else None."""
        return None

    def _u(self, threshold: float) -> float:
        """A threshold on the distance, on u (the value oriented as a similarity)."""
        return float(threshold) if self.distance.is_inverted else -float(threshold)


_PAIR_FUSES = ("circle", "unified", "multi_similarity", "contrastive")


class MultiSimilarityMiner(BaseMiner):
    """A positive pair is kept when it is less similar than the anchor's most similar negative
    plus epsilon, a negative when more similar than its least similar positive minus epsilon."""

    _default_distance = CosineSimilarity

    def __init__(self, epsilon: float = 0.1, distance=None):
        super().__init__(distance)
        self.epsilon = _validate.number("epsilon", epsilon)

    def _strips(self, x, labels, ref, ref_labels):
        self._any_pos = self._any_neg = False
        for strip in super()._strips(x, labels, ref, ref_labels):
            self._any_pos |= bool(strip[2].any())
            self._any_neg |= bool(strip[3].any())
            yield strip

    def _mine_strip(self, d, pos, neg):
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        eps = self.epsilon
        if self.distance.is_inverted:
            max_n = torch.where(neg, d, -inf).amax(1, keepdim=True)
            min_p = torch.where(pos, d, inf).amin(1, keepdim=True)
            keep_p, keep_n = pos & (d - eps < max_n), neg & (d + eps > min_p)
        else:
            min_n = torch.where(neg, d, inf).amin(1, keepdim=True)
            max_p = torch.where(pos, d, -inf).amax(1, keepdim=True)
            keep_p, keep_n = pos & (d + eps > min_n), neg & (d - eps < max_p)
        return torch.nonzero(keep_p, as_tuple=True) + torch.nonzero(keep_n, as_tuple=True)

    def _finish(self, out, labels, ref_labels):
        if not (self._any_pos and self._any_neg):  # PML: no positive or no negative pair at all
            return tuple(t[:0] for t in out)
        return out

    def fused(self, loss_name):
        if loss_name in _PAIR_FUSES:
            return loss_name, PairMiner.MULTI_SIMILARITY, (self.epsilon,)
        return None


class PairMarginMiner(BaseMiner):
    """Positive pairs farther than pos_margin, negative pairs nearer than neg_margin (for a
    similarity: less / more similar than the margins)."""

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, distance=None):
        super().__init__(distance)
        self.pos_margin = _validate.number("pos_margin", pos_margin)
        self.neg_margin = _validate.number("neg_margin", neg_margin)

    def _mine_strip(self, d, pos, neg):
        if self.distance.is_inverted:
            keep_p, keep_n = pos & (d < self.pos_margin), neg & (d > self.neg_margin)
        else:
            keep_p, keep_n = pos & (d > self.pos_margin), neg & (d < self.neg_margin)
        return torch.nonzero(keep_p, as_tuple=True) + torch.nonzero(keep_n, as_tuple=True)

    def fused(self, loss_name):
        if loss_name in _PAIR_FUSES:
            return loss_name, PairMiner.PAIR_MARGIN, (self._u(self.pos_margin), self._u(self.neg_margin))
        return None


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(BaseMiner):
    """The triplets (a, p, n) whose margin m = d_an - d_ap (s_ap - s_an for a similarity) is at
    most `margin` ("all"), and also m <= 0 ("hard") or m > 0 ("semihard"); "easy": m > margin."""

    tuple_size = 3

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", distance=None):
        super().__init__(distance)
        self.margin = _validate.number("margin", margin)
        if type_of_triplets not in TRIPLET_TYPES:
            raise ValueError(f"type_of_triplets must be one of {TRIPLET_TYPES}, got {type_of_triplets!r}")
        self.type_of_triplets = type_of_triplets

    def window(self) -> tuple[float, float]:
        """(lo, hi): a triplet is kept when lo < m <= hi."""
        inf = float("inf")
        m = float(self.margin)
        return {"all": (-inf, m), "hard": (-inf, min(m, 0.0)), "semihard": (0.0, m), "easy": (m, inf)}[
            self.type_of_triplets]

    def _mine_strip(self, d, pos, neg):
        a_all, p_all = torch.nonzero(pos, as_tuple=True)
        out = ([], [], [])
        chunk = max(1, STRIP_ELEMS // max(d.shape[1], 1))
        for c in range(0, a_all.numel(), chunk):  # chunks of positive pairs x the anchor's row
            a, p = a_all[c:c + chunk], p_all[c:c + chunk]
            ap, an = d[a, p], d[a]
            m = ap[:, None] - an if self.distance.is_inverted else an - ap[:, None]  # PML's triplet margin
            if self.type_of_triplets == "easy":
                keep = m > self.margin
            else:
                keep = m <= self.margin
                if self.type_of_triplets == "hard":
                    keep &= m <= 0
                elif self.type_of_triplets == "semihard":
                    keep &= m > 0
            k, n = torch.nonzero(keep & neg[a], as_tuple=True)
            for lst, t in zip(out, (a[k], p[k], n)):
                lst.append(t)
        empty = torch.empty(0, dtype=torch.long, device=d.device)
        return tuple(torch.cat(t) if t else empty for t in out)

    def fused(self, loss_name):
        if loss_name == "triplet_all":
            lo, hi = self.window()
            return "triplet_all", PairMiner.TRIPLET_WINDOW, (lo, hi)
        return None


_PICKS = {"hard": PairPick.HARD, "easy": PairPick.EASY, "semihard": PairPick.SEMIHARD}


class BatchEasyHardMiner(BaseMiner):
    """Per anchor one positive and one negative, each "hard", "easy", "semihard" (relative to
    the other's pick) or "all", within the allowed ranges of distance."""

    HARD, SEMIHARD, EASY, ALL = "hard", "semihard", "easy", "all"

    def __init__(self, pos_strategy: str = "easy", neg_strategy: str = "semihard", allowed_pos_range=None,
                 allowed_neg_range=None, distance=None):
        super().__init__(distance)
        strategies = (self.HARD, self.SEMIHARD, self.EASY, self.ALL)
        if pos_strategy not in strategies or neg_strategy not in strategies:
            raise ValueError(f"pos_strategy and neg_strategy must be one of {strategies}, got "
                             f"{pos_strategy!r}, {neg_strategy!r}")
        if pos_strategy == neg_strategy == self.SEMIHARD:
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if self.ALL in (pos_strategy, neg_strategy) and self.SEMIHARD in (pos_strategy, neg_strategy):
            raise ValueError('"semihard" cannot be used in combination with "all"')
        self.pos_strategy, self.neg_strategy = pos_strategy, neg_strategy
        self.allowed_pos_range, self.allowed_neg_range = allowed_pos_range, allowed_neg_range

    def _pick(self, d, cand, strategy, is_pos, bound=None, val_range=None):
        """(values, indices, rows that have a pick) of PML's get_x_per_row: a positive is hard
        when far (least similar), a negative when near; semihard picks relative to `bound`."""
        inverted = self.distance.is_inverted
        hardish = strategy in (self.HARD, self.SEMIHARD)
        far = hardish if is_pos else not hardish  # positives: hard = farthest; negatives: hard = nearest
        want_max = far != inverted  # the farthest is the largest distance, or the smallest similarity
        cand = cand.clone()
        if bound is not None:
            cand &= (d < bound[:, None]) if want_max else (d > bound[:, None])
        if val_range is not None:
            cand &= (d >= val_range[0]) & (d <= val_range[1])
        fill = torch.tensor(float("-inf") if want_max else float("inf"), dtype=d.dtype, device=d.device)
        masked = torch.where(cand, d, fill)
        vals, idx = masked.max(1) if want_max else masked.min(1)
        return vals, idx, cand.any(1)

    def _mine_strip(self, d, pos, neg):
        rows = torch.arange(d.shape[0], device=d.device)
        P, N = self.pos_strategy, self.neg_strategy
        if P == self.SEMIHARD:
            nv, ni, nk = self._pick(d, neg, N, False, val_range=self.allowed_neg_range)
            pv, pi, pk = self._pick(d, pos, P, True, bound=nv, val_range=self.allowed_pos_range)
        elif N == self.SEMIHARD:
            pv, pi, pk = self._pick(d, pos, P, True, val_range=self.allowed_pos_range)
            nv, ni, nk = self._pick(d, neg, N, False, bound=pv, val_range=self.allowed_neg_range)
        else:
            if P != self.ALL:
                pv, pi, pk = self._pick(d, pos, P, True, val_range=self.allowed_pos_range)
            if N != self.ALL:
                nv, ni, nk = self._pick(d, neg, N, False, val_range=self.allowed_neg_range)
        if self.ALL not in (P, N):
            keep = pk & nk
            return rows[keep], pi[keep], rows[keep], ni[keep]
        a1, p = torch.nonzero(pos, as_tuple=True) if P == self.ALL else (rows[pk], pi[pk])
        a2, n = torch.nonzero(neg, as_tuple=True) if N == self.ALL else (rows[nk], ni[nk])
        return a1, p, a2, n

    def fused(self, loss_name):
        fusable = self.ALL not in (self.pos_strategy, self.neg_strategy) and self.allowed_pos_range is None \
            and self.allowed_neg_range is None
        if loss_name == "triplet_all" and fusable:
            return "triplet_hard", PairMiner.EASY_HARD, (_PICKS[self.pos_strategy], _PICKS[self.neg_strategy])
        return None


class BatchHardMiner(BatchEasyHardMiner):
    """Each anchor's hardest positive and hardest negative, as triplets (a, p, n)."""

    tuple_size = 3

    def __init__(self, distance=None):
        super().__init__(pos_strategy="hard", neg_strategy="hard", distance=distance)

    def _mine_strip(self, d, pos, neg):
        a, p, _, n = super()._mine_strip(d, pos, neg)
        return a, p, n

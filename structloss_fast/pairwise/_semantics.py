"""pytorch-metric-learning's (PML) semantics of each pairwise loss, one row per engine loss name.

The one table that the shared code path of every pairwise loss reads (losses._run, the pair-list
path in tuples.py, the reducers): what the loss is written in, its default distance and reducer,
how it reads an indices_tuple and what its per-element losses are. A new pairwise loss adds its
row here; the keywords indices_tuple=, distance=, reducer= and embedding_regularizer= then work
for it with no other change (docs/pairwise.md, "PML keywords", prints this table).
"""
from __future__ import annotations

from typing import NamedTuple

from .._ids import PairStat


class Semantics(NamedTuple):
    pml_class: str | None      # the PML class it replaces (None: not in PML)
    similarity: bool           # written in a similarity (True) or a distance (False)
    default_distance: str      # "cosine" | "lp" (LpDistance(p=2, power=1), normalized)
    only_distances: tuple      # distance class names it accepts (empty: any); PML asserts these
    default_reducer: str       # "avg_non_zero" | "mean": PML's get_default_reducer
    tuples: str                # how an indices_tuple is read: "mask" (pairs, duplicates collapse into a
                               # B x M mask: PML's mat-based losses), "list" (each listed pair once),
                               # "triplets" (triplets; pairs are crossed per anchor)
    sub_losses: tuple          # per PML sub-loss: (name, PML reduction type, the engine's term, and for
                               # pair/triplet types the engine statistics that give, per anchor, the
                               # number of its elements and of its non-zero ones: ENGINE_COUNTS keys)
    flips: tuple               # parameter positions negated when the distance's orientation is
                               # not the loss's (PML's distance.margin does the same)


_ELEMENT = (("loss", "element", 0, None, None),)

SEMANTICS = {
    "circle": Semantics("CircleLoss", True, "cosine", ("CosineSimilarity",), "avg_non_zero", "mask", _ELEMENT, ()),
    "unified": Semantics(None, True, "cosine", ("CosineSimilarity",), "avg_non_zero", "mask", _ELEMENT, ()),
    "multi_similarity": Semantics("MultiSimilarityLoss", True, "cosine", (), "mean", "mask", _ELEMENT, (2,)),
    "supcon": Semantics("SupConLoss", True, "cosine", (), "avg_non_zero", "mask", _ELEMENT, ()),
    "ntxent": Semantics("NTXentLoss", True, "cosine", (), "mean", "list",
                        (("loss", "pos_pair", 0, "num_pos", "num_pos_with_neg"),), ()),
    "contrastive": Semantics("ContrastiveLoss", False, "lp", (), "avg_non_zero", "list",
                             (("pos_loss", "pos_pair", 0, "num_pos", "count0"),
                              ("neg_loss", "neg_pair", 1, "num_neg", "count1")), (0, 1)),
    "triplet_all": Semantics("TripletMarginLoss", False, "lp", (), "avg_non_zero", "triplets",
                             (("loss", "triplet", 0, "aux0", "count0"),), ()),
    "triplet_hard": Semantics("TripletMarginLoss", False, "lp", (), "avg_non_zero", "triplets",
                              (("loss", "triplet", 0, "has_both", "count0"),), ()),
}


# Per-anchor element counts from the engine's row statistics (PairStat columns).
ENGINE_COUNTS = {
    "num_pos": lambda st: st[:, PairStat.NUM_POS],
    "num_neg": lambda st: st[:, PairStat.NUM_NEG],
    "num_pos_with_neg": lambda st: st[:, PairStat.NUM_POS] * (st[:, PairStat.NUM_NEG] > 0),
    "has_both": lambda st: ((st[:, PairStat.NUM_POS] > 0) & (st[:, PairStat.NUM_NEG] > 0)).to(st.dtype),
    "aux0": lambda st: st[:, PairStat.AUX0],
    "count0": lambda st: st[:, PairStat.COUNT0],
    "count1": lambda st: st[:, PairStat.COUNT1],
}


def markdown_table() -> str:
    """The table as docs/pairwise.md shows it (tests/pairwise checks the page against it)."""
    dist = {"cosine": "CosineSimilarity()", "lp": "LpDistance(p=2, power=1)"}
    red = {"avg_non_zero": "AvgNonZeroReducer", "mean": "MeanReducer"}
    reads = {"mask": "pairs, duplicates collapse (PML's mat-based losses)", "list": "pairs, each listed pair",
             "triplets": "triplets (pairs crossed per anchor)"}
    rows = ["| loss | PML class | written in | default distance | default reducer | indices_tuple read as | "
            "per-element losses (reduction type) |", "|---|---|---|---|---|---|---|"]
    for name, s in SEMANTICS.items():
        accepts = dist[s.default_distance] + (" only" if s.only_distances else "")
        subs = ", ".join(f"{sub[0]} ({sub[1]})" for sub in s.sub_losses)
        rows.append(f"| {name} | {s.pml_class or '-'} | {'similarity' if s.similarity else 'distance'} | {accepts} | "
                    f"{red[s.default_reducer]} | {reads[s.tuples]} | {subs} |")
    return "\n".join(rows)

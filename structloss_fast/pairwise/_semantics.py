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
    default_distance: str      # "cosine" | "dot" (DotProductSimilarity(), normalized: the same values) |
                               # "lp" (LpDistance(p=2, power=1), normalized) | "lp2" (the same, power=2)
    only_distances: tuple      # distance class names it accepts (empty: any); PML asserts these
    default_reducer: str       # "avg_non_zero" | "mean" | "divisor": PML's get_default_reducer
    tuples: str                # how an indices_tuple is read: "mask" (pairs, duplicates collapse into a
                               # B x M mask: PML's mat-based losses), "list" (each listed pair once),
                               # "triplets" (triplets; pairs are crossed per anchor), "weights" (every
                               # pair is used; the tuple weights the anchors: PML's convert_to_weights),
                               # "unique_pos" (per anchor label, its first positive pair)
    sub_losses: tuple          # per PML sub-loss: (name, PML reduction type, the engine's term (None: not
                               # an engine term), and the engine statistics that give, per anchor, the
                               # number of its elements and of its non-zero ones: ENGINE_COUNTS keys, None
                               # where the engine has no such count; for an "element" sub-loss a count
                               # says which anchors are elements)
    flips: tuple               # parameter positions negated when the distance's orientation is
                               # not the loss's (PML's distance.margin does the same)
    ext: bool = True           # its engine kernels take the PairExtParam block (another distance, a fused
                               # miner); False: they compute its default distance only, others are listed
    requires: tuple = ()       # (distance attribute, value) pairs that PML asserts besides the class


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
    "generalized_lifted_structure": Semantics("GeneralizedLiftedStructureLoss", False, "lp", (), "mean", "mask",
                                              _ELEMENT, (), ext=False),
    "tuplet_margin": Semantics("TupletMarginLoss", True, "cosine", ("CosineSimilarity",), "mean", "list",
                               (("loss", "pos_pair", 0, "num_pos", None),), (), ext=False),
    "margin": Semantics("MarginLoss", False, "lp", (), "divisor", "triplets",
                        (("margin_loss", "triplet", 0, None, None),
                         ("beta_reg_loss", "already_reduced; element with num_classes", None, None, None)), (),
                        ext=False),
    "fastap": Semantics("FastAPLoss", False, "lp2", ("LpDistance",), "mean", "weights",
                        (("loss", "element", 0, "num_pos", None),), (), ext=False,
                        requires=(("normalize_embeddings", True), ("p", 2))),
    "npairs": Semantics("NPairsLoss", True, "dot", (), "mean", "unique_pos", (("loss", "element", None, None, None),),
                        (), ext=False),
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
    dist = {"cosine": "CosineSimilarity()", "dot": "DotProductSimilarity()", "lp": "LpDistance(p=2, power=1)",
            "lp2": "LpDistance(p=2, power=2)"}
    red = {"avg_non_zero": "AvgNonZeroReducer", "mean": "MeanReducer", "divisor": "DivisorReducer"}
    reads = {"mask": "pairs, duplicates collapse (PML's mat-based losses)", "list": "pairs, each listed pair",
             "triplets": "triplets (pairs crossed per anchor)",
             "weights": "anchor weights (every pair is used; PML's convert_to_weights)",
             "unique_pos": "positive pairs, the first per anchor label"}
    rows = ["| loss | PML class | written in | default distance | default reducer | indices_tuple read as | "
            "per-element losses (reduction type) |", "|---|---|---|---|---|---|---|"]
    for name, s in SEMANTICS.items():
        accepts = dist[s.default_distance] + (" only" if s.only_distances else "")
        if s.requires:  # a class and attributes (FastAP: any power of a normalized p = 2 distance)
            accepts = f"{dist[s.default_distance]}; {s.only_distances[0]} with " \
                      + ", ".join(f"{k}={v!r}" for k, v in s.requires) + " only"
        subs = ", ".join(f"{sub[0]} ({sub[1]})" for sub in s.sub_losses)
        rows.append(f"| {name} | {s.pml_class or '-'} | {'similarity' if s.similarity else 'distance'} | {accepts} | "
                    f"{red[s.default_reducer]} | {reads[s.tuples]} | {subs} |")
    return "\n".join(rows)

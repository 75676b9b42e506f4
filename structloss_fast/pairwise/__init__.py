"""Pairwise family: Circle loss and its relatives on one fused engine that never builds the
B x M similarity matrix, cross-batch memory, and multi-process training.

Layout: reference.py (the definitions), _ops.py (op registration, backends, the reduction),
_triton.py (GPU kernels), losses.py (functions and Modules), cross_batch_memory.py,
distributed.py. Mathematics: docs/spec/pairwise.md.
"""
from . import _ops  # noqa: F401  (registers structloss_fast::pairwise_loss's glue and backends)
from .cross_batch_memory import CrossBatchMemory
from .distributed import DistributedPairwiseLoss
from .losses import (
    CircleLoss,
    ContrastiveLoss,
    FastAPLoss,
    GeneralizedLiftedStructureLoss,
    MarginLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    NTXentLoss,
    PairwiseLoss,
    SupConLoss,
    TripletMarginLoss,
    TupletMarginLoss,
    UnifiedLoss,
    circle_loss,
    contrastive_loss,
    fastap_loss,
    generalized_lifted_structure_loss,
    loss_terms,
    margin_based_loss,
    multi_similarity_loss,
    npairs_loss,
    ntxent_loss,
    supcon_loss,
    triplet_margin_loss,
    tuplet_margin_loss,
    unified_loss,
)

__all__ = [
    "circle_loss", "unified_loss", "multi_similarity_loss", "supcon_loss", "ntxent_loss", "contrastive_loss",
    "triplet_margin_loss", "loss_terms",
    "CircleLoss", "UnifiedLoss", "MultiSimilarityLoss", "SupConLoss", "NTXentLoss", "ContrastiveLoss",
    "TripletMarginLoss", "PairwiseLoss", "CrossBatchMemory", "DistributedPairwiseLoss",
    "generalized_lifted_structure_loss", "tuplet_margin_loss", "margin_based_loss", "fastap_loss", "npairs_loss",
    "GeneralizedLiftedStructureLoss", "TupletMarginLoss", "MarginLoss", "FastAPLoss", "NPairsLoss",
]

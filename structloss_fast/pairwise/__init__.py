"""Pairwise family: Circle loss and its relatives on one fused engine that never builds the
B x M similarity matrix, cross-batch memory, and multi-process training.

Layout: reference.py (the definitions), _ops.py (op registration, backends, the reduction),
_triton.py (GPU kernels), losses.py (functions and Modules: the one code path of every loss),
_semantics.py (pytorch-metric-learning's semantics per loss), tuples.py (the losses on listed
pairs), distances.py, reducers.py, regularizers.py, miners.py, cross_batch_memory.py,
self_supervised.py, distributed.py. Mathematics: docs/spec/pairwise.md.
"""
from . import _ops  # noqa: F401  (registers structloss_fast::pairwise_loss's glue and backends)
from .cross_batch_memory import CrossBatchMemory
from .distances import CosineSimilarity, DotProductSimilarity, LpDistance
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
from .miners import BatchEasyHardMiner, BatchHardMiner, MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner
from .reducers import (
    AvgNonZeroReducer,
    ClassWeightedReducer,
    DivisorReducer,
    DoNothingReducer,
    MeanReducer,
    MultipleReducers,
    PerAnchorReducer,
    SumReducer,
    ThresholdReducer,
)
from .regularizers import LpRegularizer
from .self_supervised import SelfSupervisedLoss

__all__ = [
    "circle_loss", "unified_loss", "multi_similarity_loss", "supcon_loss", "ntxent_loss", "contrastive_loss",
    "triplet_margin_loss", "loss_terms",
    "CircleLoss", "UnifiedLoss", "MultiSimilarityLoss", "SupConLoss", "NTXentLoss", "ContrastiveLoss",
    "TripletMarginLoss", "PairwiseLoss", "CrossBatchMemory", "DistributedPairwiseLoss", "SelfSupervisedLoss",
    "CosineSimilarity", "DotProductSimilarity", "LpDistance",
    "MeanReducer", "SumReducer", "AvgNonZeroReducer", "ThresholdReducer", "PerAnchorReducer", "ClassWeightedReducer",
    "DivisorReducer", "DoNothingReducer", "MultipleReducers", "LpRegularizer",
    "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "BatchEasyHardMiner", "BatchHardMiner",
    "generalized_lifted_structure_loss", "tuplet_margin_loss", "margin_based_loss", "fastap_loss", "npairs_loss",
    "GeneralizedLiftedStructureLoss", "MarginLoss", "FastAPLoss", "NPairsLoss", "TupletMarginLoss",
]

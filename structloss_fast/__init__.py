"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch."""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from . import pairwise
from ._ext import BackendUnavailable
from .cross_batch_memory import CrossBatchMemory
from .distributed import DistributedPairwiseLoss
from .pairwise import (
    CircleLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    TripletMarginLoss,
    UnifiedLoss,
    circle_loss,
    contrastive_loss,
    multi_similarity_loss,
    ntxent_loss,
    supcon_loss,
    triplet_margin_loss,
    unified_loss,
)

__all__ = ["BackendUnavailable", "CrossBatchMemory", "DistributedPairwiseLoss", "__version__"]
__all__ += pairwise.__all__

"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch."""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from ._ext import BackendUnavailable
from .pairwise import CircleLoss, UnifiedLoss, circle_loss, unified_loss

from .seal import (CostAugmentedNet, EnergyNet, NCERankingLoss, gbi_inference, margin_loss, nce_ranking_loss,
                   regression_loss, sampled_nce_loss, seal_bernoulli, seal_task_loss)

__all__ = ["BackendUnavailable", "CircleLoss", "UnifiedLoss", "circle_loss", "unified_loss", "__version__",
           "CostAugmentedNet", "EnergyNet", "NCERankingLoss", "gbi_inference", "margin_loss", "nce_ranking_loss",
           "regression_loss", "sampled_nce_loss", "seal_bernoulli", "seal_task_loss"]

"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch."""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from ._ext import BackendUnavailable
from .pairwise import CircleLoss, UnifiedLoss, circle_loss, unified_loss

__all__ = ["BackendUnavailable", "CircleLoss", "UnifiedLoss", "circle_loss", "unified_loss", "__version__"]

# ---- softmax family ----
from .margin_heads import (  # noqa: E402
    ArcFaceLoss,
    CircleClassLoss,
    CosFaceLoss,
    NormFaceLoss,
    arcface_loss,
    circle_class_loss,
    cosface_loss,
    normface_loss,
)
from .softmax import EncouragingLoss, LinearEncouragingLoss, encouraging_loss, linear_encouraging_loss  # noqa: E402

__all__ += [
    "encouraging_loss", "EncouragingLoss", "linear_encouraging_loss", "LinearEncouragingLoss",
    "normface_loss", "cosface_loss", "arcface_loss", "circle_class_loss",
    "NormFaceLoss", "CosFaceLoss", "ArcFaceLoss", "CircleClassLoss",
]

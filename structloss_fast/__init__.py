"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch."""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from ._ext import BackendUnavailable
from .pairwise import CircleLoss, UnifiedLoss, circle_loss, unified_loss

__all__ = ["BackendUnavailable", "CircleLoss", "UnifiedLoss", "circle_loss", "unified_loss", "__version__"]

# ---- cg / taskmet family ----
from .cg import CGNotConverged, CGResult, CGWarning, cg  # noqa: E402

__all__ += ["CGNotConverged", "CGResult", "CGWarning", "cg"]

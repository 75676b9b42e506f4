"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch.

One subpackage per family, each re-exported here: pairwise, softmax, jem, taskmet, seal.
"""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from . import jem, pairwise, seal, softmax, taskmet
from ._registry import BackendUnavailable
from .jem import *  # noqa: F401,F403
from .pairwise import *  # noqa: F401,F403
from .seal import *  # noqa: F401,F403
from .softmax import *  # noqa: F401,F403
from .taskmet import *  # noqa: F401,F403

FAMILIES = ("pairwise", "softmax", "jem", "taskmet", "seal")

__all__ = ["BackendUnavailable", "FAMILIES", "__version__"]
for _family in (pairwise, softmax, jem, taskmet, seal):
    __all__ += _family.__all__
del _family

"""structloss_fast: fast, exact structured and metric-learning losses for PyTorch.

One subpackage per family, each re-exported here: pairwise, softmax, jem, taskmet, seal, and the
two training methods of the same newsletter, imitation and adversarial.
"""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled ops)
from . import adversarial, imitation, jem, pairwise, seal, softmax, taskmet
from ._registry import BackendUnavailable
from .adversarial import *  # noqa: F401,F403
from .imitation import *  # noqa: F401,F403
from .jem import *  # noqa: F401,F403
from .pairwise import *  # noqa: F401,F403
from .seal import *  # noqa: F401,F403
from .softmax import *  # noqa: F401,F403
from .taskmet import *  # noqa: F401,F403

FAMILIES = ("pairwise", "softmax", "jem", "taskmet", "seal", "imitation", "adversarial")

__all__ = ["BackendUnavailable", "FAMILIES", "__version__"]
for _family in (pairwise, softmax, jem, taskmet, seal, imitation, adversarial):
    __all__ += _family.__all__
del _family

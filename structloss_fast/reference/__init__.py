"""Pure-PyTorch definitions of every loss: short, dense, float64-friendly. Tests and benchmarks
compare the fast backends against these."""
from . import pairwise  # noqa: F401
from . import softmax  # noqa: F401,E402
from . import seal  # noqa: F401,E402

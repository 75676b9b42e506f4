"""Every identifier shared with the C++ kernels, mirrored from csrc/common/ids.h.

tests/test_ids.py parses that header and checks these enums against it (names, values and the
per-loss facts), so the two cannot drift. Triton kernels use them as named `tl.constexpr`
constants (see each family's _triton.py), never as bare numbers.
"""
from __future__ import annotations

import enum
from typing import NamedTuple


class PairLoss(enum.IntEnum):
    """The `loss` argument of structloss_fast::pairwise_loss (C++ PairLossKind)."""

    CIRCLE = 0
    UNIFIED = 1
    MULTI_SIMILARITY = 2
    SUP_CON = 3
    NT_XENT = 4
    CONTRASTIVE = 5
    TRIPLET_ALL = 6
    TRIPLET_HARD = 7
    GEN_LIFTED = 8
    TUPLET_MARGIN = 9
    MARGIN_ALL = 10
    FAST_AP = 11


class PairLossInfo(NamedTuple):
    terms: int         # the loss is the sum of this many terms, each with its own reducer count
    params: int        # how many float parameters it takes
    gated: bool        # 0 for a batch without any positive or any negative pair
    row_counted: bool  # an anchor counts for the reducer only when its term is non-zero


PAIR_LOSS_INFO = {
    PairLoss.CIRCLE: PairLossInfo(1, 2, False, True),
    PairLoss.UNIFIED: PairLossInfo(1, 2, False, True),
    PairLoss.MULTI_SIMILARITY: PairLossInfo(1, 3, False, False),
    PairLoss.SUP_CON: PairLossInfo(1, 1, True, True),
    PairLoss.NT_XENT: PairLossInfo(1, 1, True, False),
    PairLoss.CONTRASTIVE: PairLossInfo(2, 2, False, False),
    PairLoss.TRIPLET_ALL: PairLossInfo(1, 1, False, False),
    PairLoss.TRIPLET_HARD: PairLossInfo(1, 1, False, True),
    PairLoss.GEN_LIFTED: PairLossInfo(1, 2, False, False),
    PairLoss.TUPLET_MARGIN: PairLossInfo(1, 2, True, False),
    PairLoss.MARGIN_ALL: PairLossInfo(1, 1, False, False),
    PairLoss.FAST_AP: PairLossInfo(1, 1, False, False),
}


# The losses with a parameter per anchor (MarginLoss's beta): they run on the op
# pairwise_loss_rowparam, which pairwise_loss refuses (C++ pair_loss_has_row_params).
PAIR_LOSSES_WITH_ROW_PARAMS = frozenset({PairLoss.MARGIN_ALL})


class PairStat(enum.IntEnum):
    """Columns of the pairwise row statistics (C++ PairStat, prefix kPair)."""

    AUX0 = 0
    AUX1 = 1
    SUM0 = 2
    COUNT0 = 3
    SUM1 = 4
    COUNT1 = 5
    NUM_POS = 6
    NUM_NEG = 7


# Per term k: the column of its per-anchor value and of its reducer count.
PAIR_TERM_SUM = (PairStat.SUM0, PairStat.SUM1)
PAIR_TERM_COUNT = (PairStat.COUNT0, PairStat.COUNT1)


class PairGradMode(enum.IntEnum):
    """The `grad_mode` argument of pairwise_loss (C++ PairGradMode, prefix kGrad)."""

    NONE = 0
    X = 1
    X_REF = 2


class PairExtParam(enum.IntEnum):
    """Positions in the optional block at the end of pairwise_loss's params (C++ PairExtParam, prefix kExt)."""

    VALUE = 0
    POWER = 1
    RAW_NORMS = 2
    MINER = 3
    MINER0 = 4
    MINER1 = 5
    MINER2 = 6


class PairValue(enum.IntEnum):
    """What a pairwise strip holds when the epilogue reads it (C++ PairValue, prefix kValue)."""

    GEMM = 0
    NEG_GEMM = 1
    DIST_POW = 2
    NEG_DIST_POW = 3


class PairMiner(enum.IntEnum):
    """A miner fused into the pairwise loss's pass (C++ PairMiner, prefix kMiner)."""

    NONE = 0
    MULTI_SIMILARITY = 1
    PAIR_MARGIN = 2
    TRIPLET_WINDOW = 3
    EASY_HARD = 4


class PairPick(enum.IntEnum):
    """BatchEasyHardMiner's choice of a positive or a negative (C++ PairPick, prefix kPick)."""

    HARD = 0
    EASY = 1
    SEMIHARD = 2


class SoftmaxTransform(enum.IntEnum):
    """The `transform` argument of the softmax ops."""

    IDENTITY = 0
    NORM_FACE = 1
    COS_FACE = 2
    ARC_FACE = 3
    CIRCLE_CLASS = 4


class SoftmaxStat(enum.IntEnum):
    """Columns of the softmax row statistics (C++ SoftmaxStat, prefix kSm)."""

    LSE = 0
    ROW_LOSS = 1
    S = 2
    GRAD_Y = 3
    GRAD_HI = 4
    MAX_OTHER = 5
    COUNT_MAX = 6
    MAX = 7
    LOG_SUM = 8


class SoftmaxParam(enum.IntEnum):
    """Positions in the `params` list of the softmax ops (C++ SoftmaxParam, prefix kP)."""

    LOG_END = 0
    RHO = 1
    SMOOTH = 2
    EPS = 3
    T0 = 4
    T1 = 5


class SoftmaxPool(enum.IntEnum):
    """The `pool` argument of pooled_linear_softmax_loss (C++ SoftmaxPool, prefix kPool)."""

    MAX = 0
    SOFT_AVG = 1


class ProxyAnchorStat(enum.IntEnum):
    """Columns of proxy_anchor_loss's per-class statistics (C++ ProxyAnchorStat, prefix kPa)."""

    POS_TERM = 0
    NEG_TERM = 1
    NUM_POS = 2
    NUM_NEG = 3


class CGStatus(enum.IntEnum):
    """The per-column status output of the conjugate-gradient ops."""

    RUNNING = 0
    CONVERGED = 1
    NEGATIVE_CURVATURE = 2
    BREAKDOWN = 3


# C++ enum name -> (Python enum, prefix of its enumerators after the leading "k").
CXX_ENUMS = {
    "PairLossKind": (PairLoss, ""),
    "PairStat": (PairStat, "Pair"),
    "PairGradMode": (PairGradMode, "Grad"),
    "PairExtParam": (PairExtParam, "Ext"),
    "PairValue": (PairValue, "Value"),
    "PairMiner": (PairMiner, "Miner"),
    "PairPick": (PairPick, "Pick"),
    "SoftmaxTransform": (SoftmaxTransform, ""),
    "SoftmaxStat": (SoftmaxStat, "Sm"),
    "SoftmaxParam": (SoftmaxParam, "P"),
    "SoftmaxPool": (SoftmaxPool, "Pool"),
    "ProxyAnchorStat": (ProxyAnchorStat, "Pa"),
    "CGStatus": (CGStatus, ""),
}

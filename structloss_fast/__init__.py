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

# sgld / jem family
from .jem import (  # noqa: E402
    JEMDivergenceError, JEMTrainer, ReplayBuffer, SGLDSampler, class_gaussian_init, jem_loss,
)
from .jem_eval import (  # noqa: E402
    expected_calibration_error, ood_auroc, pgd_attack, reliability_diagram, robust_accuracy,
)
from .sgld import SGLD_VARIANTS, sgld_step_  # noqa: E402

__all__ += [
    "SGLD_VARIANTS", "sgld_step_", "ReplayBuffer", "SGLDSampler", "JEMTrainer", "JEMDivergenceError", "jem_loss",
    "class_gaussian_init", "expected_calibration_error", "reliability_diagram", "ood_auroc", "pgd_attack",
    "robust_accuracy",
]

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

# ---- seal family ----
from .seal import (  # noqa: E402
    CostAugmentedNet, EnergyNet, NCERankingLoss, gbi_inference, margin_loss, nce_ranking_loss, regression_loss,
    sampled_nce_loss, seal_bernoulli, seal_task_loss,
)

__all__ += [
    "CostAugmentedNet", "EnergyNet", "NCERankingLoss", "gbi_inference", "margin_loss", "nce_ranking_loss",
    "regression_loss", "sampled_nce_loss", "seal_bernoulli", "seal_task_loss",
]

# ---- cg / taskmet family ----
from .cg import CGNotConverged, CGResult, CGWarning, cg  # noqa: E402
from .taskmet import (  # noqa: E402
    DiagonalMetricNet, MetricNet, TaskMetConfig, TaskMetTrainer, custom_argmin, implicit_argmin, mahalanobis_loss,
    unrolled_argmin,
)

__all__ += [
    "CGNotConverged", "CGResult", "CGWarning", "cg", "mahalanobis_loss", "MetricNet", "DiagonalMetricNet",
    "implicit_argmin", "custom_argmin", "unrolled_argmin", "TaskMetConfig", "TaskMetTrainer",
]

# ---- imitation family (Go Wide, Then Narrow) ----
from . import imitation  # noqa: E402
from .imitation import FeatureLinear, LayerImitationLoss, WideThenNarrow, layer_imitation_loss  # noqa: E402

__all__ += ["imitation", "layer_imitation_loss", "LayerImitationLoss", "WideThenNarrow", "FeatureLinear"]

# ---- adversarial family (robust training and transfer) ----
from . import adversarial  # noqa: E402
from .adversarial import (  # noqa: E402
    TRANSFER_MODES, PGDAdversarialLoss, TRADESLoss, TransferResult, pgd_adversarial_loss, trades_loss, transfer,
)

__all__ += ["adversarial", "pgd_adversarial_loss", "trades_loss", "PGDAdversarialLoss", "TRADESLoss", "transfer",
            "TransferResult", "TRANSFER_MODES"]

"""SEAL family: structured energy networks as losses for multi-label classification, with a
fused noise-contrastive sample-and-score kernel, the trainers, and SPEN's gradient-based
inference as the baseline.

Layout: reference.py (the definitions), _ops.py (op registration, backends, the reduction),
_triton.py (GPU kernels), losses.py (energy network and losses), train.py (trainers), data.py
(synthetic tasks and metrics). Mathematics: docs/spec/seal.md.
"""
from .losses import (
    CostAugmentedNet,
    EnergyNet,
    NCERankingLoss,
    gbi_inference,
    margin_loss,
    nce_ranking_loss,
    regression_loss,
    sampled_nce_loss,
    seal_bernoulli,
    seal_task_loss,
)
from .losses import manhattan_delta, soft_f1  # noqa: F401  (the family's own metrics, not re-exported)

__all__ = [
    "CostAugmentedNet", "EnergyNet", "NCERankingLoss", "gbi_inference", "margin_loss", "nce_ranking_loss",
    "regression_loss", "sampled_nce_loss", "seal_bernoulli", "seal_task_loss",
]

"""JEM family: a classifier as an energy-based model. The fused in-place SGLD step with
in-kernel noise, the replay buffer, sampler and trainer, and the evaluation (calibration, OOD
detection, robustness).

Layout: reference.py (the definitions), _ops.py (op registration and backends), sgld.py (the
step), training.py (buffer, sampler, loss, trainer), evaluation.py, models.py.
Mathematics: docs/spec/jem.md.
"""
from .evaluation import expected_calibration_error, ood_auroc, pgd_attack, reliability_diagram, robust_accuracy
from .sgld import SGLD_VARIANTS, sgld_step_
from .training import JEMDivergenceError, JEMTrainer, ReplayBuffer, SGLDSampler, class_gaussian_init, jem_loss

__all__ = [
    "SGLD_VARIANTS", "sgld_step_", "ReplayBuffer", "SGLDSampler", "JEMTrainer", "JEMDivergenceError", "jem_loss",
    "class_gaussian_init", "expected_calibration_error", "reliability_diagram", "ood_auroc", "pgd_attack",
    "robust_accuracy",
]

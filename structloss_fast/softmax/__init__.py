"""Row-softmax family: the Encouraging Loss with F.cross_entropy's interface, margin-softmax heads
(NormFace, CosFace, ArcFace, class-level Circle), and the fused linear form that never
materializes the (N, C) logits.

Layout: reference.py (the definitions), _ops.py (op registration, backends, the reduction),
_triton.py (GPU kernels), encouraging.py (encouraging_loss, linear_encouraging_loss and their
Modules), margin_heads.py. Mathematics: docs/spec/softmax.md.
"""
from .encouraging import EncouragingLoss, LinearEncouragingLoss, encouraging_loss, linear_encouraging_loss
from .margin_heads import (
    ArcFaceLoss,
    CircleClassLoss,
    CosFaceLoss,
    NormFaceLoss,
    arcface_loss,
    circle_class_loss,
    cosface_loss,
    normface_loss,
)
from .proxy_losses import (
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    SubCenterArcFaceLoss,
    normalized_softmax_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    soft_triple_loss,
    subcenter_arcface_loss,
)

__all__ = [
    "encouraging_loss", "EncouragingLoss", "linear_encouraging_loss", "LinearEncouragingLoss",
    "normface_loss", "cosface_loss", "arcface_loss", "circle_class_loss",
    "NormFaceLoss", "CosFaceLoss", "ArcFaceLoss", "CircleClassLoss",
    "normalized_softmax_loss", "proxy_nca_loss", "subcenter_arcface_loss", "soft_triple_loss", "proxy_anchor_loss",
    "NormalizedSoftmaxLoss", "ProxyNCALoss", "SubCenterArcFaceLoss", "SoftTripleLoss", "ProxyAnchorLoss",
]

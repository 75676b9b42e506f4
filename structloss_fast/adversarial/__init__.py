"""Adversarially robust training and transfer (docs/adversarial.md, docs/spec/adversarial.md):
PGD adversarial training (Madry et al.) and TRADES losses built on structloss_fast.pgd_attack,
and the fixed-feature / full-network transfer evaluation of Salman et al."""
from .losses import TRADES_START_STD, PGDAdversarialLoss, TRADESLoss, pgd_adversarial_loss, trades_loss  # noqa: F401
from .transfer import TRANSFER_MODES, TransferResult, find_head, transfer  # noqa: F401

__all__ = ["pgd_adversarial_loss", "trades_loss", "PGDAdversarialLoss", "TRADESLoss", "transfer", "TransferResult",
           "TRANSFER_MODES"]

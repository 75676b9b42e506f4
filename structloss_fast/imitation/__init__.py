"""Go Wide, Then Narrow (Zhou et al., ICML 2020): the layer-imitation loss over every prefix of
an adapted thin network, and the WideThenNarrow helper that builds the adapters and runs the
three stages (docs/imitation.md, docs/spec/imitation.md)."""
from .losses import LayerImitationLoss, layer_imitation_loss
from .wide_then_narrow import SCHEDULES, FeatureLinear, WideThenNarrow  # noqa: F401  (SCHEDULES: the family's own)

__all__ = ["layer_imitation_loss", "LayerImitationLoss", "WideThenNarrow", "FeatureLinear"]

"""A small convolutional classifier for JEM experiments on small images (the digits example
and the benchmarks). No BatchNorm: JEM's samples and data then see the same network (the
paper drops it for stability), and per-sample energies do not depend on the batch."""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]

_ACTIVATIONS = {"leaky_relu": lambda: nn.LeakyReLU(0.2), "silu": nn.SiLU, "relu": nn.ReLU}


class SmallCNN(nn.Module):
    """conv3x3(c -> w) - act - conv3x3/2(w -> 2w) - act - conv3x3/2(2w -> 2w) - act - linear.

    Args:
        in_channels, n_classes, image_size: input (C, image_size, image_size) and classes.
        width: channels of the first layer (w).
        activation: "leaky_relu" (0.2, as the paper's WRN), "silu" or "relu".
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, *, image_size: int = 8, width: int = 32,
                 activation: str = "leaky_relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), act(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), act(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width * side * side, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

"""The SGLD step, spelled out in PyTorch: the definition the fused kernels are checked against
(docs/spec/jem.md). Out of place; `noise` is the standard-normal eps (None: no noise).

    JEM (the authors' code):   x + (step_size * g + noise_std * eps)
    the paper's Langevin form: x - (step_size / 2) * dE/dx + sqrt(step_size) * eps,  dE/dx = -g
with g = clamp(grad, *grad_clamp) when a gradient clamp is given, then x clamped to x_clamp
when given, the noise term added before that clamp (SADA-JEM) or after it (JEM++:
noise_after_clamp=True); a clamp is (lo, hi) or c for (-c, c). `grad` is the gradient of the log-density, grad_x LSE_y f(x)[y].

The increment is formed first and then added to x, as the authors' `x.data += a * g + b *
torch.randn_like(x)` rounds it; the compiled kernels round in exactly this order.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def step_coefficients(step_size: float, noise_std: float | None, form: str) -> tuple[float, float]:
    """(gradient coefficient, noise coefficient) of a form."""
    if form == "jem":
        return float(step_size), float(noise_std)
    if form == "langevin":
        return float(step_size) / 2.0, math.sqrt(float(step_size))
    raise ValueError(f"form must be 'jem' or 'langevin', got {form!r}")


def _bounds(value):
    if value is None or isinstance(value, (tuple, list)):
        return value
    return (-float(value), float(value))


def sgld_step(
    x: Tensor,
    grad: Tensor,
    noise: Tensor | None,
    *,
    step_size: float,
    noise_std: float | None = None,
    grad_clamp: tuple[float, float] | None = None,
    x_clamp: tuple[float, float] | None = None,
    noise_after_clamp: bool = False,
    form: str = "jem",
) -> Tensor:
    a, b = step_coefficients(step_size, noise_std, form)
    grad_clamp, x_clamp = _bounds(grad_clamp), _bounds(x_clamp)
    g = grad if grad_clamp is None else torch.clamp(grad, grad_clamp[0], grad_clamp[1])
    if form == "langevin":
        energy_grad = -g
        inc = -(a * energy_grad)
    else:
        inc = a * g
    if noise is not None and not noise_after_clamp:
        inc = inc + b * noise
    y = x + inc
    if x_clamp is not None:
        y = torch.clamp(y, x_clamp[0], x_clamp[1])
    if noise is not None and noise_after_clamp:
        y = y + b * noise
    return y

"""The fused SGLD step (docs/spec/jem.md): `sgld_step_` updates x in place in one pass
(read x and grad, write x), with the Gaussian noise generated inside the kernel.

Variants (presets in SGLD_VARIANTS; any combination of the arguments is allowed):
    "jem"       x <- x + a g + s eps                               (Grathwohl et al., the authors' code)
    "jem++"     x <- clamp(x + a clamp(g, -1, 1), -1, 1) + s eps   (noise optional, after the clamp)
    "sada-jem"  x <- clamp(x + a clamp(g, -1, 1) + s eps, -1, 1)   (noise before the clamp)
    "langevin"  x <- x - (a / 2) dE/dx + sqrt(a) eps               (the paper's proper Langevin form)
where g = grad_x log p(x) = grad_x LSE_y f(x)[y] = -dE/dx.

Reproducibility: the noise is counter-based Philox keyed from torch's generator of x's device
(or `generator=`), so `torch.manual_seed` reproduces a chain; on CPU the result does not depend
on the thread count, and on CUDA the step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _registry, _validate
from . import _ops
from . import reference as _ref

__all__ = ["sgld_step_", "SGLD_VARIANTS", "FORMS"]

FORMS = ("jem", "langevin")

# Presets of (form, grad_clamp, x_clamp, noise_after_clamp) and the authors' step and noise.
SGLD_VARIANTS = {
    "jem": dict(form="jem", grad_clamp=None, x_clamp=None, noise_after_clamp=False, step_size=1.0, noise_std=0.01),
    "jem++": dict(form="jem", grad_clamp=1.0, x_clamp=(-1.0, 1.0), noise_after_clamp=True, step_size=1.0,
                  noise_std=0.0),
    "sada-jem": dict(form="jem", grad_clamp=1.0, x_clamp=(-1.0, 1.0), noise_after_clamp=False, step_size=1.0,
                     noise_std=0.01),
    "langevin": dict(form="langevin", grad_clamp=None, x_clamp=None, noise_after_clamp=False, step_size=1e-4,
                     noise_std=None),
}

ClampArg = Optional[Union[float, tuple]]


def clamp_bounds(name: str, value: ClampArg) -> Optional[tuple[float, float]]:
    """None, a positive number c (meaning (-c, c)), or a pair (lo, hi) with lo <= hi."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number c or a pair (lo, hi), got {value!r}")
        lo = _validate.number(f"{name}[0]", value[0])
        hi = _validate.number(f"{name}[1]", value[1])
        if lo > hi:
            raise ValueError(f"{name} must have lo <= hi, got ({value[0]}, {value[1]})")
        return lo, hi
    c = _validate.number(name, value, lo=0.0)
    return -c, c


def _check_like(name: str, t: Tensor, x: Tensor) -> None:
    _validate.tensor(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {_validate._desc(t)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {_validate._desc(t)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {_validate._desc(t)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": the compiled kernel of the device (reference where none is built); there is no
    Triton kernel for this op."""
    return _registry.resolve(_ops.OP, backend, device)


def check_step_args(x, grad, *, step_size, noise_std, grad_clamp, x_clamp, noise_after_clamp, form, noise,
                    generator):
    """Validates the arguments of sgld_step_ and returns (step_coef, noise_coef, grad_clamp, x_clamp)."""
    _validate.tensor("x", x, floating=True)
    _check_like("grad", grad, x)
    if noise is not None:
        _check_like("noise", noise, x)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    step_size = _validate.number("step_size", step_size, lo=0.0)
    if form == "jem":
        if noise_std is None:
            raise ValueError("noise_std is required for form='jem' (0 for no noise)")
        noise_std = _validate.number("noise_std", noise_std, lo=0.0)
    elif noise_std is not None:
        raise ValueError("form='langevin' fixes the noise to sqrt(step_size) * eps; leave noise_std=None")
    if not isinstance(noise_after_clamp, bool):
        raise TypeError(f"noise_after_clamp must be a bool, got {type(noise_after_clamp).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator is a {generator.device.type} generator, x is on {x.device}")
    a, b = _ref.step_coefficients(step_size, noise_std, form)
    return a, b, clamp_bounds("grad_clamp", grad_clamp), clamp_bounds("x_clamp", x_clamp)


def sgld_step_(
    x: Tensor,
    grad: Tensor,
    *,
    step_size: float,
    noise_std: Optional[float] = None,
    grad_clamp: ClampArg = None,
    x_clamp: ClampArg = None,
    noise_after_clamp: bool = False,
    form: str = "jem",
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tensor:
    """One SGLD step in place on x; returns x.

    Args:
        x: samples, any shape, float16/bfloat16/float32/float64. Updated in place (under
            no_grad, like an optimizer step; a leaf that requires grad is fine).
        grad: grad_x log p(x) (= -dE/dx), the shape and dtype of x.
        step_size: a >= 0. form="jem": x += a g; form="langevin": x += (a / 2) g.
        noise_std: s >= 0, the noise's std for form="jem" (required; 0 draws no noise at all);
            must be None for form="langevin" (whose noise std is sqrt(a)).
        grad_clamp: clamp g to (lo, hi) (or (-c, c) for a number c) before the step.
        x_clamp: clamp x to (lo, hi) (or (-c, c)) after the step.
        noise_after_clamp: add the noise after the x clamp (JEM++) instead of before it
            (SADA-JEM). Without x_clamp it only changes the rounding order.
        form: "jem" (the authors' decoupled step and noise) or "langevin" (the paper's form).
        noise: an explicit standard-normal eps (the shape and dtype of x) instead of the
            kernel's own; every backend then computes the same result (tests, comparisons).
        generator: the torch.Generator the noise is keyed from (default: the device's
            default generator, so torch.manual_seed reproduces the step).
        backend: "auto" | "reference" | "cpu" | "cuda".

    The kernels draw the noise from Philox (one 64-bit draw of the CPU generator per call, or
    the CUDA generator's Philox offset); the reference draws torch.randn from the same generator
    (so reference and kernel noise differ; pass `noise=` to compare them).
    """
    a, b, gclamp, xclamp = check_step_args(
        x, grad, step_size=step_size, noise_std=noise_std, grad_clamp=grad_clamp, x_clamp=x_clamp,
        noise_after_clamp=noise_after_clamp, form=form, noise=noise, generator=generator,
    )
    chosen = resolve_backend(backend, x.device)
    with torch.no_grad():
        if chosen == "reference":
            eps = noise
            if eps is None and b != 0.0:
                eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            x.copy_(_ref.sgld_step(x, grad, eps, step_size=step_size, noise_std=noise_std, grad_clamp=gclamp,
                                   x_clamp=xclamp, noise_after_clamp=noise_after_clamp, form=form))
            return x
        _ops.sgld_step_(x, grad, noise, a, b, gclamp or (), xclamp or (), noise_after_clamp, generator)
    return x


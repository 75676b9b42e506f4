"""Input validation at the public entry points: one place, messages that name the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, value, *, ndim: int | None = None, floating: bool = False, integer: bool = False):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {_desc(value)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {_desc(value)}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex):
        raise TypeError(f"{name} must hold integer class labels, got {_desc(value)}")
    return value


def same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        listed = ", ".join(f"{k} on {v.device}" for k, v in items)
        raise ValueError(f"all tensors must be on one device, got {listed}")


def length(name: str, t: torch.Tensor, n: int, other: str) -> None:
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row of {other} ({n}), got {_desc(t)}")


def _real(name: str, value, integral: bool):
    """A Python number from an int / float, a numpy scalar, a 0-d tensor (as PML takes its
    parameters) or a symbolic value under torch.compile (specialized: a parameter is a constant
    of the compiled graph). Booleans are refused."""
    kind = "an int" if integral else "a number"
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or (
                integral and value.is_floating_point()):
            raise TypeError(f"{name} must be {kind} or a 0-d real tensor, got a tensor of {_desc(value)}")
        if value.requires_grad:
            # The kernels take it as a constant: its gradient would be silently zero.
            raise TypeError(f"{name} is a constant of the loss and gets no gradient; pass {name}.detach() "
                            f"(a tensor that requires grad was given: {_desc(value)})")
        value = value.item()  # reads the value: a synchronisation for a CUDA tensor
    elif isinstance(value, (torch.SymInt, torch.SymFloat)):
        value = int(value) if isinstance(value, torch.SymInt) else float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integral and not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return int(value) if integral else float(value)


def integer(name: str, value, *, lo=None) -> int:
    """An int option (a Python or numpy int, a 0-d integer tensor), >= lo when given."""
    v = _real(name, value, integral=True)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return v


def number(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """A finite float option within [lo, hi] (open ends on request); see _real for what is taken."""
    v = _real(name, value, integral=False)
    if not -math.inf < v < math.inf:  # (a comparison, not math.isfinite: v may be symbolic under torch.compile)
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return v


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value

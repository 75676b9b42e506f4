"""Input validation at the public entry points: one place, messages that name the argument."""
from __future__ import annotations

import math

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


def number(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
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

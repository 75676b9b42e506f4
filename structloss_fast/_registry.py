"""The one backend registry: which kernels each op has, which one "auto" picks, and why not.

Each op declares itself once, in its family's _ops.py, with `declare(OpSpec(...))`: its
kernels, the order in which "auto" tries them on a GPU, a `check_supported` hook for
problem-dependent limits (e.g. the embedding size a Triton kernel can hold) and a sentence
for each limit. `resolve` serves every family:
- an explicit backend runs or raises BackendUnavailable with the reason; it never falls back;
- "auto" takes the first candidate for the tensors' device that is available and supported
  ("cpu" on CPU; the op's gpu_order on CUDA), and the reference only when none is (with a
  one-time warning when a kernel is missing from this installation). `python -m structloss_fast info` prints these orders and limits.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Optional

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
KERNEL_BACKENDS = ("cpu", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run for these inputs."""


# check_supported(backend, **problem) -> None when that backend's kernel takes the problem,
# else the reason it does not.
CheckSupported = Callable[..., Optional[str]]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str                           # structloss_fast::<name>
    family: str
    kernels: tuple[str, ...]            # of "cpu", "cuda", "triton"
    gpu_order: tuple[str, ...] = ()     # "auto" on CUDA tensors tries these in order (default: kernels' order)
    check_supported: Optional[CheckSupported] = None
    limits: dict = dataclasses.field(default_factory=dict)  # backend -> what check_supported refuses, in words

    def candidates(self, device_type: str) -> tuple[str, ...]:
        if device_type == "cpu":
            return tuple(b for b in ("cpu",) if b in self.kernels)
        if device_type == "cuda":
            order = self.gpu_order or tuple(b for b in ("triton", "cuda") if b in self.kernels)
            return tuple(b for b in order if b in self.kernels)
        return ()


_OPS: dict[str, OpSpec] = {}


def declare(spec: OpSpec) -> OpSpec:
    for b in spec.kernels + spec.gpu_order:
        if b not in KERNEL_BACKENDS:
            raise ValueError(f"{spec.name}: unknown kernel backend {b!r}")
    if spec.name in _OPS and _OPS[spec.name] != spec:
        raise ValueError(f"op {spec.name} declared twice")
    _OPS[spec.name] = spec
    return spec


def op(name: str) -> OpSpec:
    return _OPS[name]


def ops() -> dict[str, OpSpec]:
    return dict(_OPS)


def backend_status(backend: str, device, op_name: str) -> tuple[bool, str]:
    """Whether `backend` can run `op_name` on tensors of `device` at all, and why not
    (problem-independent; see resolve for the problem-dependent limits)."""
    dev = torch.device(device).type
    spec = _OPS[op_name]
    if backend == "reference":
        return True, "pure PyTorch"
    if backend not in KERNEL_BACKENDS:
        return False, f"unknown backend {backend!r}"
    if backend not in spec.kernels:
        return False, f"structloss_fast has no {backend} kernel for {op_name} (it has: {', '.join(spec.kernels)})"
    if not _ext.extension_loaded():
        return False, _ext.extension_error()
    if backend in ("cpu", "cuda"):
        if backend != dev:
            return False, f"the {backend} backend runs {backend.upper()} tensors, these are on {dev}"
        key = backend.upper()
        if not _ext.has_kernel(op_name, key):
            if key == "CUDA":
                return False, "this build has no CUDA kernels (CPU-only torch or no CUDA toolkit at build time)"
            return False, "no CPU kernel in this build"
        return True, "compiled"
    ok, why = _ext.triton_status()
    if not ok:
        return False, why
    if dev == "cuda":
        return True, why
    if dev == "cpu" and _ext.triton_interpret():
        return True, why + " (interpreter, TRITON_INTERPRET=1)"
    return False, f"Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); these are on {dev}"


def unsupported_reason(op_name: str, backend: str, **problem) -> Optional[str]:
    """Why `backend`'s kernel does not take this problem (None: it does, or no problem given)."""
    spec = _OPS[op_name]
    if backend == "reference" or spec.check_supported is None or not problem:
        return None
    return spec.check_supported(backend, **problem)


def resolve(op_name: str, backend: str, device, **problem) -> str:
    """The backend that runs `op_name` for tensors on `device`; `problem` holds what the op's
    check_supported hook looks at (shapes, dtypes, the loss)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        ok, why = backend_status(backend, device, op_name)
        if ok:
            why = unsupported_reason(op_name, backend, **problem)
            ok = why is None
        if not ok:
            raise BackendUnavailable(f"backend={backend!r} cannot run {op_name} here: {why}")
        return backend
    spec = _OPS[op_name]
    dev = torch.device(device).type
    unavailable = []
    for cand in spec.candidates(dev):
        ok, why = backend_status(cand, device, op_name)
        if not ok:
            unavailable.append(f"{cand}: {why}")
        elif unsupported_reason(op_name, cand, **problem) is None:
            return cand
    if unavailable:
        # A declared limit (check_supported) is documented; a kernel missing from this
        # installation is worth a warning.
        _warn_once(f"structloss_fast: {op_name} on {dev} tensors runs on the (slow, dense) reference "
                   f"({'; '.join(unavailable)})")
    return "reference"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def auto_order(op_name: str, device_type: str) -> str:
    """What "auto" tries on tensors of this device type, in words (for info and the docs)."""
    spec = _OPS[op_name]
    steps = []
    for cand in spec.candidates(device_type):
        limit = spec.limits.get(cand)
        steps.append(f"{cand} (unless {limit})" if limit else cand)
    steps.append("reference")
    return " -> ".join(steps)

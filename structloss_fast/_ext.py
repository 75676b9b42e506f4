"""Loading the compiled ops and telling which backends can run here (and why not)."""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_C = None
_C_ERROR: str | None = None
try:
    from . import _C  # noqa: F811  (registers torch.ops.structloss_fast.*)
except ImportError as exc:  # source checkout that was not built
    _C_ERROR = f"the compiled extension structloss_fast._C did not load ({exc}); build it with `pip install --no-build-isolation -e .`"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run for these inputs."""


def extension_loaded() -> bool:
    return _C is not None


def _registered_kernels() -> dict[str, frozenset]:
    # Read once at import: the lookups below are then plain Python that torch.compile can trace.
    if _C is None:
        return {"CPU": frozenset(), "CUDA": frozenset()}
    return {
        key: frozenset(
            name.split("::", 1)[1].split(".", 1)[0]
            for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
            if name.startswith("structloss_fast::")
        )
        for key in ("CPU", "CUDA")
    }


_KERNELS = _registered_kernels()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether structloss_fast::<op> has a kernel registered for a dispatch key ("CPU", "CUDA")."""
    return op in _KERNELS.get(dispatch_key, ())


def _find_triton() -> tuple[bool, str]:
    # Located, not imported: importing structloss_fast must not import triton (optional, slow,
    # and TRITON_INTERPRET must be set before its first import).
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "(unknown version)"
    return True, f"triton {version}"


_TRITON = _find_triton()


def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton runs CUDA tensors on a GPU, and CPU tensors under TRITON_INTERPRET=1."""
    return _TRITON


# Backends each op family implements; ops not declared here have all of them.
_OP_BACKENDS: dict[str, tuple[str, ...]] = {}


def declare_backends(op: str, backends) -> None:
    """Record which of "cpu", "cuda", "triton" implement structloss_fast::<op>, so that "auto"
    only picks those and an explicit request for another names the real reason."""
    _OP_BACKENDS[op] = tuple(backends)


def op_backends(op: str) -> tuple[str, ...]:
    return _OP_BACKENDS.get(op, ("cpu", "cuda", "triton"))


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(backend: str, device: torch.device, op: str) -> tuple[bool, str]:
    """Whether `backend` can run `op` on tensors of `device`, and why not."""
    dev = torch.device(device).type
    if backend == "reference":
        return True, "pure PyTorch"
    if backend in ("cpu", "cuda", "triton") and backend not in op_backends(op):
        return False, f"structloss_fast has no {backend} kernel for {op} (it has: {', '.join(op_backends(op))})"
    if backend in ("cpu", "cuda"):
        if _C is None:
            return False, _C_ERROR or "extension not loaded"
        if backend != dev:
            return False, f"the {backend} backend runs {backend.upper()} tensors, these are on {dev}"
        key = "CPU" if backend == "cpu" else "CUDA"
        if not has_kernel(op, key):
            why = "this build has no CUDA kernels (CPU-only torch or no CUDA toolkit at build time)" if key == "CUDA" else "no CPU kernel"
            return False, why
        return True, "compiled"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if dev == "cuda":
            return True, why
        if dev == "cpu" and triton_interpret():
            return True, why + " (interpreter, TRITON_INTERPRET=1)"
        return False, f"Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); these are on {dev}"
    return False, f"unknown backend {backend!r}"


def resolve_backend(backend: str, device: torch.device, op: str, fast_gpu: str = "triton") -> str:
    """Pick the backend for `op` on `device`. "auto": the compiled CPU kernel for CPU tensors, the
    GPU kernel (fast_gpu first) for CUDA tensors, the reference only where no kernel exists for
    that device. An explicit backend that cannot run raises BackendUnavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device).type
    if backend != "auto":
        ok, why = backend_status(backend, device, op)
        if not ok:
            raise BackendUnavailable(f"backend={backend!r} cannot run {op} here: {why}")
        return backend
    if dev == "cpu":
        candidates = ["cpu"]
    elif dev == "cuda":
        candidates = [b for b in (fast_gpu, "cuda" if fast_gpu == "triton" else "triton") if b in op_backends(op)]
    else:
        candidates = []
    for cand in candidates:
        if backend_status(cand, device, op)[0]:
            return cand
    if _C is None:
        _warn_once(f"structloss_fast: {_C_ERROR}; backend='auto' uses the (slow, dense) reference")
    return "reference"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)

"""Loading the compiled ops, and what this installation has: kernels per dispatch key, Triton."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

_C = None
_C_ERROR: str | None = None
try:
    from . import _C  # noqa: F811  (registers torch.ops.structloss_fast.*)
except ImportError as exc:  # source checkout that was not built
    _C_ERROR = f"the compiled extension structloss_fast._C did not load ({exc}); build it with `pip install --no-build-isolation -e .`"

NAMESPACE = "structloss_fast"


def extension_loaded() -> bool:
    return _C is not None


def extension_error() -> str:
    return _C_ERROR or "the compiled extension is not loaded"


def _registered_kernels() -> dict[str, frozenset]:
    # Read once at import: the lookups below are then plain Python that torch.compile can trace.
    if _C is None:
        return {"CPU": frozenset(), "CUDA": frozenset()}
    return {
        key: frozenset(
            name.split("::", 1)[1].split(".", 1)[0]
            for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
            if name.startswith(f"{NAMESPACE}::")
        )
        for key in ("CPU", "CUDA")
    }


_KERNELS = _registered_kernels()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether structloss_fast::<op> has a compiled kernel for a dispatch key ("CPU", "CUDA")."""
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


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

"""`python -m structloss_fast info`: versions, and for every op which backends are built and
usable here, what "auto" picks, and where it falls back (from the backend registry)."""
from __future__ import annotations

import platform

import torch

from . import FAMILIES, __version__, _ext, _registry


def _cell(backend: str, device: str, op: str, gpu: bool) -> str:
    usable, reason = _registry.backend_status(backend, torch.device(device), op)
    if device == "cuda" and usable and not gpu:
        usable, reason = False, "no GPU is visible"
    return ("yes" if usable else "no") + f" ({reason})"


def report() -> str:
    lines = [
        f"structloss_fast {__version__}",
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}"
        f" (CUDA {torch.version.cuda or 'none'}), threads {torch.get_num_threads()}",
    ]
    ok, why = _ext.triton_status()
    lines.append(f"triton: {why}" + ("" if ok else " [optional]"))
    lines.append(f"compiled extension: {'loaded' if _ext.extension_loaded() else _ext.extension_error()}")
    gpu = torch.cuda.is_available()
    lines.append(f"GPU: {torch.cuda.get_device_name() if gpu else 'none visible to torch'}")
    lines.append("")
    lines.append("backends per op (cpu tensors | cuda tensors), and what backend='auto' tries in order:")
    ops = _registry.ops()
    for family in FAMILIES:
        for name, spec in ops.items():
            if spec.family != family:
                continue
            lines.append(f"  {family}: {name} (kernels: {', '.join(spec.kernels)})")
            for backend in ("reference",) + spec.kernels:
                lines.append(f"    {backend:<9} {_cell(backend, 'cpu', name, gpu)}  |  {_cell(backend, 'cuda', name, gpu)}")
            lines.append(f"    auto, cpu tensors:  {_registry.auto_order(name, 'cpu')}")
            lines.append(f"    auto, cuda tensors: {_registry.auto_order(name, 'cuda')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0

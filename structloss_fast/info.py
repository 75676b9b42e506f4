"""`python -m structloss_fast info`: versions and which backends are built and usable here."""
from __future__ import annotations

import platform

import torch

from . import __version__, _ext

# One op per family that has compiled kernels; info reports each backend for these.
PROBE_OPS = {
    "pairwise": "pairwise_loss",
    "softmax": "softmax_loss",
    "sgld": "sgld_step_",
    "cg": "cg_dense",
    "seal": "seal_nce_loss",
    "imitation": "layer_imitation_loss",
}


def report() -> str:
    lines = [
        f"structloss_fast {__version__}",
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}"
        f" (CUDA {torch.version.cuda or 'none'}), threads {torch.get_num_threads()}",
    ]
    ok, why = _ext.triton_status()
    lines.append(f"triton: {why}" + ("" if ok else " [optional]"))
    lines.append(f"compiled extension: {'loaded' if _ext.extension_loaded() else _ext._C_ERROR}")
    gpu = torch.cuda.is_available()
    lines.append(f"GPU: {torch.cuda.get_device_name() if gpu else 'none visible to torch'}")
    lines.append("")
    lines.append("backend availability (cpu tensors | cuda tensors):")
    for family, op in PROBE_OPS.items():
        lines.append(f"  {family} ({op}):")
        for backend in ("reference", "cpu", "cuda", "triton"):
            cells = []
            for dev in ("cpu", "cuda"):
                usable, reason = _ext.backend_status(backend, torch.device(dev), op)
                if dev == "cuda" and usable and not gpu:
                    usable, reason = False, "no GPU is visible"
                cells.append(("yes" if usable else "no") + f" ({reason})")
            lines.append(f"    {backend:<9} {cells[0]}  |  {cells[1]}")
        if "cuda" in _ext.op_backends(op):
            built_cuda = _ext.has_kernel(op, "CUDA")
            lines.append(f"    CUDA kernels compiled into this build: {'yes' if built_cuda else 'no'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0

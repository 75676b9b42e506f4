"""Op glue of the fused SGLD step (structloss_fast::sgld_step_, CPU and CUDA kernels in
csrc/cpu/jem.cpp and csrc/cuda/jem.cu): its backends and the fake kernel for torch.compile /
opcheck. The op mutates x and returns nothing; it is not
differentiable (SGLD runs outside the graph), so it has no autograd formula."""
from __future__ import annotations

import torch

from .. import _ext, _oplib, _registry

OP = "sgld_step_"
_registry.declare(_registry.OpSpec(OP, family="jem", kernels=("cpu", "cuda")))


def _fake_sgld_step(x, grad, noise, step_coef, noise_coef, grad_clamp, x_clamp, noise_after_clamp, generator, philox):
    torch._check(grad.shape == x.shape, lambda: f"grad must have the shape of x {tuple(x.shape)}")
    torch._check(grad.dtype == x.dtype, lambda: "grad must have the dtype of x")
    if noise is not None:
        torch._check(noise.shape == x.shape, lambda: f"noise must have the shape of x {tuple(x.shape)}")
        torch._check(noise.dtype == x.dtype, lambda: "noise must have the dtype of x")
    return None


if _ext.extension_loaded():
    torch.library.register_fake(f"structloss_fast::{OP}")(_fake_sgld_step)
    _oplib.register_autocast(OP)


def sgld_step_(x, grad, noise, step_coef, noise_coef, grad_clamp, x_clamp, noise_after_clamp, generator, philox=()):
    """The compiled op (the dispatcher picks the CPU or CUDA kernel by device)."""
    torch.ops.structloss_fast.sgld_step_(
        x, grad, noise, float(step_coef), float(noise_coef), list(grad_clamp), list(x_clamp),
        bool(noise_after_clamp), generator, list(philox),
    )

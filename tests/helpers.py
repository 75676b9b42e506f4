"""Test helpers: the backends a test runs, dtype-aware comparisons, numerical gradients, optional
packages imported by the tests that use them. (The ahead-of-time compile of the Triton kernels
for a GPU that is not here is structloss_fast._aot.)"""
from __future__ import annotations

import torch

from structloss_fast import _ext, _registry


def triton_device():
    """The device Triton kernels are tested on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def can_run(backend: str, op: str, device=None) -> bool:
    """Whether `backend` can run structloss_fast::<op> on this machine (on `device`; Triton's
    device by default for "triton")."""
    if device is None:
        device = triton_device() if backend == "triton" else torch.device(backend if backend != "reference" else "cpu")
    return _registry.backend_status(backend, device, op)[0]


def fast_backends(op: str, backends=("cpu", "cuda", "triton")):
    """(backend, device) pairs that can run structloss_fast::<op> here; tests run every one.
    The compiled CPU kernel must exist (a test run on an unbuilt checkout fails loudly rather
    than silently testing less); CUDA and Triton join when this machine can run them."""
    out = []
    if "cpu" in backends:
        assert _ext.has_kernel(op, "CPU"), f"structloss_fast::{op} has no CPU kernel: {_ext.extension_error()}"
        out.append(("cpu", torch.device("cpu")))
    if "cuda" in backends and torch.cuda.is_available() and can_run("cuda", op, torch.device("cuda")):
        out.append(("cuda", torch.device("cuda")))
    if "triton" in backends and can_run("triton", op):
        out.append(("triton", triton_device()))
    return out


class LazyImport:
    """`LazyImport("pytorch_metric_learning.losses").CircleLoss(...)` imports the module when
    the test calls it: a test that needs a missing optional package is skipped, and the tests of
    the same module that do not need it still run (an import at module level would skip them
    all, and a GPU machine without the package would look green with nothing run)."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            import pytest

            return getattr(pytest.importorskip(self._module), name)(*args, **kwargs)

        call.__name__ = name
        return call


def max_abs(a, b) -> float:
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


def assert_close_to_truth(out, truth, torch_same_dtype, *, factor=2.0, floor=0.0, what=""):
    """Error of `out` against a float64 `truth` at most `factor` times the error that PyTorch itself
    makes in the same dtype (`torch_same_dtype`, the reference run in that dtype), plus `floor`.
    This is flash-attention's criterion for low-precision kernels."""
    err = max_abs(out, truth)
    torch_err = max_abs(torch_same_dtype, truth)
    bound = factor * torch_err + floor
    assert err <= bound, f"{what}: error {err:.3e} > {factor} x torch's own error {torch_err:.3e} + {floor:.1e}"


def assert_tight(out, expected, *, rtol=1e-10, atol=1e-12, what=""):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    err = max_abs(out, expected)
    assert err <= atol + rtol * scale, f"{what}: error {err:.3e} (scale {scale:.3e})"


def numerical_grad(fn, x, eps=1e-6):
    """Central-difference gradient of scalar fn at x (float64)."""
    g = torch.zeros_like(x)
    flat = x.detach().clone().reshape(-1)
    for k in range(flat.numel()):
        old = flat[k].item()
        flat[k] = old + eps
        fp = fn(flat.view_as(x)).item()
        flat[k] = old - eps
        fm = fn(flat.view_as(x)).item()
        flat[k] = old
        g.view(-1)[k] = (fp - fm) / (2 * eps)
    return g

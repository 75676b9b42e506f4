"""Shared test set-up. Without a GPU, Triton kernels run on CPU tensors under the interpreter:
TRITON_INTERPRET must be set before triton is first imported, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from structloss_fast import _ext  # noqa: E402


def triton_device():
    """The device Triton kernels are tested on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fast_backends(op: str, backends=("cpu", "cuda", "triton")):
    """(backend, device) pairs that can run structloss_fast::<op> here; tests run every one.
    The compiled CPU kernel must exist (a test run on an unbuilt checkout fails loudly rather
    than silently testing less); CUDA and Triton join when this machine can run them."""
    out = []
    if "cpu" in backends:
        assert _ext.has_kernel(op, "CPU"), f"structloss_fast::{op} has no CPU kernel: {_ext._C_ERROR or 'not built'}"
        out.append(("cpu", torch.device("cpu")))
    if "cuda" in backends and torch.cuda.is_available() and _ext.backend_status("cuda", torch.device("cuda"), op)[0]:
        out.append(("cuda", torch.device("cuda")))
    if "triton" in backends and _ext.backend_status("triton", triton_device(), op)[0]:
        out.append(("triton", triton_device()))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

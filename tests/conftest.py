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


def fast_backends():
    """(backend, device) pairs that can run here; every one of them is tested."""
    out = []
    if _ext.backend_status("cpu", torch.device("cpu"), "pairwise_loss")[0]:
        out.append(("cpu", torch.device("cpu")))
    if torch.cuda.is_available() and _ext.backend_status("cuda", torch.device("cuda"), "pairwise_loss")[0]:
        out.append(("cuda", torch.device("cuda")))
    if _ext.backend_status("triton", triton_device(), "pairwise_loss")[0]:
        out.append(("triton", triton_device()))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

"""Shared test set-up. Without a GPU, Triton kernels run on CPU tensors under the interpreter:
TRITON_INTERPRET must be set before triton is first imported, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

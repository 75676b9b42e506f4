"""Shared test set-up.

- Without a GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must
  be set before triton is first imported, so it is set here. The interpreter is also made to
  type a Python float argument as the compiler does (fp32): a kernel that relied on the
  interpreter keeping the double would pass here and lose digits on a GPU.
- Every test that runs on a CUDA device gets the `gpu` marker (`make gpu-check` runs
  `pytest -m gpu`): a parameter that is a CUDA device (a torch.device, or a string naming one),
  a parameter id naming cuda, or, on a machine with a GPU, a Triton test (Triton runs CUDA
  tensors there). A test can also carry @pytest.mark.gpu itself.
- `--test-time-limit S`: a test that runs longer than S seconds fails, and the run goes on.
"""
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _type_floats_as_the_compiler_does():
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no triton: nothing to adjust
        return
    original = interpreter._implicit_cvt
    if getattr(original, "_slf_fp32_floats", False):
        return

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    convert._slf_fp32_floats = True
    interpreter._implicit_cvt = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _type_floats_as_the_compiler_does()


def pytest_addoption(parser):
    parser.addoption("--test-time-limit", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (0: no limit)")


def _names_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    if isinstance(value, (tuple, list)):
        return any(_names_cuda(v) for v in value)
    return False


def is_gpu_test(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        if any(_names_cuda(v) for v in callspec.params.values()):
            return True
        if "cuda" in callspec.id.split("-"):
            return True
    return torch.cuda.is_available() and "triton" in item.nodeid.lower()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_gpu_test(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--test-time-limit")
    if not limit or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past the {limit:g} s time limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

"""What the Triton side promises that a CPU can check: every launch runs on its inputs' device,
no launch path synchronizes with the host, scalar parameters keep float64's digits, and the
test infrastructure marks every CUDA-device test `gpu`."""
from __future__ import annotations

import ast
import contextlib
import pathlib
import types

import pytest
import torch

from tests.conftest import is_gpu_test

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRITON_MODULES = sorted((ROOT / "structloss_fast").glob("*/_triton.py"))


def _calls(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


@pytest.mark.parametrize("path", TRITON_MODULES, ids=lambda p: p.parent.name)
def test_every_launch_goes_through_the_device_guard(path):
    """kernel[grid](...) launches on the *current* CUDA device: the kernels launch only through
    _triton_support.launch, which enters the inputs' device first."""
    direct = [ast.unparse(c.func) for c in _calls(path) if isinstance(c.func, ast.Subscript)]
    assert not direct, f"{path.parent.name}/_triton.py launches without the device guard: {direct}"


@pytest.mark.parametrize("path", TRITON_MODULES, ids=lambda p: p.parent.name)
def test_no_host_synchronisation_in_launch_paths(path):
    """No .item(), .cpu(), .tolist() or torch.tensor(...) (a host-to-device copy) around the
    launches: each would wait for the GPU (or the copy) on every call and break CUDA-graph capture."""
    bad = []
    for c in _calls(path):
        name = ast.unparse(c.func)
        if name.endswith((".item", ".cpu", ".tolist")) or name == "torch.tensor":
            bad.append(f"line {c.lineno}: {name}(...)")
    assert not bad, f"{path.parent.name}/_triton.py: " + "; ".join(bad)


def test_launch_enters_the_inputs_device(monkeypatch):
    from structloss_fast import _triton_support

    class OnSecondGpu(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, entered[-1] if entered else None))

    t = torch.empty(0).as_subclass(OnSecondGpu)
    _triton_support.launch(Kernel(), (3,), 1, t, BLOCK=4)
    assert launched == [((3,), torch.device("cuda", 1))]
    launched.clear()
    entered.clear()
    _triton_support.launch(Kernel(), (3,), torch.empty(0))  # CPU tensors (interpreter): no guard
    assert launched == [((3,), None)]


def test_f64_bits_round_trip_every_value():
    from structloss_fast._triton_support import F64_KEY, f64_bits

    for v in (0.0, -0.0, 0.1, 1e-310, -2.5, 1e300, float("inf"), float("-inf")):
        bits = f64_bits(v)
        assert not (-2**31 <= bits < 2**31), f"{v} would be an i32 argument"
        back = torch.tensor([bits ^ F64_KEY], dtype=torch.int64).view(torch.float64).item()
        assert back == v and str(back) == str(v)


try:
    import triton
    import triton.language as tl

    from structloss_fast._triton_support import f64

    @triton.jit
    def _store_scalars(OUT, value, bits):
        tl.store(OUT, value.to(tl.float64))
        tl.store(OUT + 1, f64(bits))
except ImportError:  # no triton: the test below skips
    _store_scalars = None


@pytest.mark.skipif(_store_scalars is None or torch.cuda.is_available(),
                    reason="checks the interpreter's typing (triton present, no GPU)")
def test_interpreter_types_float_arguments_as_the_compiler_does():
    """conftest makes the interpreter pass a Python float as fp32 (the compiled signature), and
    f64 keeps the double: a float64 parameter passed as a float would fail the fp64 tests here."""
    from structloss_fast._triton_support import f64_bits, launch

    out = torch.zeros(2, dtype=torch.float64)
    launch(_store_scalars, (1,), out, 0.1, f64_bits(0.1))
    assert out[0].item() == float(torch.tensor(0.1, dtype=torch.float32))  # fp32, as compiled
    assert out[1].item() == 0.1


def _item(params: dict, nodeid="tests/x.py::test"):
    callspec = types.SimpleNamespace(params=params, id="-".join(str(v) for v in params.values()))
    return types.SimpleNamespace(callspec=callspec, nodeid=nodeid)


def test_gpu_marker_follows_cuda_parameters():
    assert is_gpu_test(_item({"backend": "triton", "device": torch.device("cuda")}))
    assert is_gpu_test(_item({"device": "cuda:1"}))
    assert is_gpu_test(_item({"pair": ("cuda", torch.device("cuda"))}))
    assert not is_gpu_test(_item({"backend": "cpu", "device": torch.device("cpu")}, nodeid="tests/x.py::test_cpu"))
    # a Triton test runs on the GPU where there is one
    assert is_gpu_test(_item({"device": torch.device("cpu")}, nodeid="tests/x.py::test_triton")) == \
        torch.cuda.is_available()


def test_gpu_marker_is_applied(request):
    """This session's collected CUDA-device tests carry the marker (none without a GPU)."""
    items = request.session.items
    for item in items:
        if is_gpu_test(item):
            assert item.get_closest_marker("gpu") is not None, item.nodeid


@pytest.mark.parametrize("B", [512, 2048, 8192, 65536])
def test_pairwise_grids_fill_an_h100(monkeypatch, B):
    """The sweep over the references is split so that a batch too small for one program per SM
    (B = 2048: 32 blocks of 64 rows, 132 SMs) still starts about two programs per SM, and a
    large one is not split (each split costs a merge)."""
    from structloss_fast.pairwise import _triton as tk

    monkeypatch.setattr(tk, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    for entry in tk.GPU_TABLE:
        row_blocks = -(-B // entry.block("BLOCK_M"))
        splits, split_len = tk.split_sweep(row_blocks, B, entry.block("BLOCK_N"), cuda)
        assert row_blocks * splits >= min(132, -(-B // entry.block("BLOCK_N")) * row_blocks), (entry, splits)
        assert split_len % entry.block("BLOCK_N") == 0 and splits * split_len >= B > (splits - 1) * split_len
        if row_blocks >= 2 * 132:
            assert splits == 1
    assert tk.split_sweep(1, 10_000, 64, cuda, allowed=False) == (1, 10_048)

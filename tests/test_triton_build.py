"""Without a GPU the Triton kernels run only in the interpreter, which is lenient about types,
layouts and resources: compile every configuration the dispatcher can choose ahead of time for
Hopper (sm_90, Triton's bundled ptxas, in a process without TRITON_INTERPRET), as a GPU run
would, and read back what the compiler reports:

- each family's GPU_TABLE entry compiles for each of its kernels (structloss_fast._aot);
- the shared memory of each launch fits sm_90's 227 KB (an accepted input always has a
  launchable configuration: the tables tile D and L instead of holding them whole);
- no 32-bit product of a runtime size feeds an address (offsets past 2^31 stay exact);
- no kernel takes a float scalar argument (Triton would pass a float64 parameter as fp32);
- registers and stack (spills) are reported (pytest -s prints the table).

The default run compiles each entry with its heaviest specializations; STRUCTLOSS_FAST_AOT_FULL=1
compiles every loss, transform and mode (`make gpu-check --full-aot` does too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from structloss_fast._triton_support import SM90_SHARED_LIMIT, pick

FAMILIES = ("pairwise", "softmax", "seal")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{family: records} of one ahead-of-time compile of every family (in parallel)."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    cmd = [sys.executable, "-m", "structloss_fast._aot", "--json", str(out), "--jobs", str(os.cpu_count() or 1)]
    if os.environ.get("STRUCTLOSS_FAST_AOT_FULL") == "1":
        cmd.append("--full")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1800)
    if "ptxas" in proc.stdout.lower() and "not found" in proc.stdout.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    print("\n" + "\n".join(proc.stdout.splitlines()))
    records = json.loads(out.read_text())["records"]
    by_family: dict[str, list] = {}
    for r in records:
        by_family.setdefault(r["family"], []).append(r)
    return by_family


def _triton_module(family):
    import importlib

    return importlib.import_module(f"structloss_fast.{family}._triton")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_table_entry_compiles_for_sm90(compiled, family):
    records = compiled[family]
    failures = [f"{r['kernel']} [{r['label']}]: {r.get('error', '')[:500]}" for r in records if not r.get("ok")]
    assert not failures, "\n".join(failures)
    assert all(r["target"] == "sm_90" for r in records)
    # every entry of the table, for every kernel of the family, is among the compiled ones
    m = _triton_module(family)
    kernels = {c.name for c in m.aot_configs()}
    for entry in m.GPU_TABLE:
        for kernel in kernels - {"_bernoulli_kernel"}:
            assert any(r["kernel"] == kernel and r["label"].startswith(entry.describe()) for r in records), \
                f"{kernel} was not compiled for {entry.describe()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_memory_fits_sm90(compiled, family):
    over = [f"{r['kernel']} [{r['label']}]: {r['shared']} bytes" for r in compiled[family]
            if r.get("ok") and r["shared"] > SM90_SHARED_LIMIT]
    assert not over, f"over sm_90's {SM90_SHARED_LIMIT} bytes of shared memory:\n" + "\n".join(over)


@pytest.mark.parametrize("family", FAMILIES)
def test_index_arithmetic_is_64_bit(compiled, family):
    narrow = [f"{r['kernel']} [{r['label']}]: {r['narrow_products'][:2]}" for r in compiled[family]
              if r.get("ok") and r["narrow_products"]]
    assert not narrow, "32-bit products of runtime sizes feed addresses:\n" + "\n".join(narrow)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_float_scalar_arguments(compiled, family):
    floats = [f"{r['kernel']} [{r['label']}]: {r['float_scalars']}" for r in compiled[family]
              if r.get("ok") and r["float_scalars"]]
    assert not floats, "float scalar arguments (fp32 in the compiled kernel):\n" + "\n".join(floats)


@pytest.mark.parametrize("family", FAMILIES)
def test_registers_are_reported(compiled, family):
    # ptxas caps registers at 255 per thread and spills the rest to the stack (reported, not
    # failed: a spill costs time, not correctness); a stack of kilobytes would be a broken entry.
    for r in compiled[family]:
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
        assert r["stack"] is not None and r["stack"] < 4096, r


def test_checker_flags_32_bit_address_products():
    """The 64-bit check can fail: a row * stride product in int32 is reported, in int64 not."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "structloss_fast._aot", "--self-test"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "self-test passed" in proc.stdout


# ---------------------------------------------------------------- check_supported from the tables


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_check_supported_is_derived_from_the_table(family, dtype, monkeypatch):
    """On a GPU, check_supported accepts exactly the problems GPU_TABLE has an entry for, and the
    tables cover every size (D, C or L): there is no size the dispatcher accepts without a
    compiled configuration, and none it refuses for want of one."""
    m = _triton_module(family)
    monkeypatch.setattr(m, "table", lambda device: m.GPU_TABLE)
    for size in (1, 16, 17, 128, 129, 256, 257, 2048, 2049, 4097, 70000):
        x = torch.empty((3, size), dtype=dtype, device="meta")
        has_entry = pick(m.GPU_TABLE, dtype, size) is not None
        if family == "pairwise":
            reason = m.check_supported(x, int(m.PairLoss.CIRCLE))
        elif family == "softmax":
            reason = m.check_supported(x)
        else:
            reason = m.check_supported(x, 20)
            has_entry = pick(m.GPU_TABLE, torch.float64 if dtype == torch.float64 else torch.float32, size) is not None
        assert (reason is None) == has_entry, (size, reason)
        assert has_entry, f"{family}: no configuration for {dtype} at size {size}"

"""One benchmark measurement in a fresh process: python -m structloss_fast.bench.worker ...

Prints one JSON object on its last line of stdout: status, times (seconds), peak memory
(bytes above the memory held once the inputs exist).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(case_key, provider, size, device, min_time, max_repeats, slow_s):
    import torch

    from . import get_case

    case = get_case(case_key)
    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    run = case.providers[provider](size, dev)
    gc.collect()
    sync()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    if is_cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base

    times = []
    if first >= slow_s:
        times = [first]  # too slow to repeat: the first call is the sample
    else:
        budget_end = time.perf_counter() + min_time
        while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() < budget_end):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
            if first >= min_time and len(times) >= 1:
                break
    q = sorted(times)
    return {
        "status": "ok",
        "time_s": statistics.median(q),
        "time_min_s": q[0],
        "time_q25_s": q[len(q) // 4],
        "time_q75_s": q[(3 * len(q)) // 4],
        "first_call_s": first,
        "repeats": len(q),
        "peak_mem_bytes": max(int(peak), 0),
    }


def run_measurement(case, provider, size, device, min_time=1.0, max_repeats=30, slow=8.0, mem_limit_gb=0.0) -> dict:
    """One measurement in this (fresh) process, errors reported in the result's status."""
    if mem_limit_gb > 0 and device == "cpu":
        limit = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        return measure(case, provider, size, device, min_time, max_repeats, slow)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower()
        if oom:
            return {"status": "out of memory" + (f" (limit {mem_limit_gb:g} GB)" if mem_limit_gb else "")}
        traceback.print_exc()
        return {"status": f"failed: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    except Exception as exc:  # report, don't crash the suite
        traceback.print_exc()
        return {"status": f"failed: {type(exc).__name__}: {exc}"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--provider", required=True)
    ap.add_argument("--size", required=True, help="JSON object")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--max-repeats", type=int, default=30)
    ap.add_argument("--slow", type=float, default=8.0, help="a first call this slow is the only sample")
    ap.add_argument("--mem-limit-gb", type=float, default=0.0, help="cap on the process's data segment (CPU)")
    args = ap.parse_args(argv)
    result = run_measurement(args.case, args.provider, json.loads(args.size), args.device, args.min_time,
                             args.max_repeats, args.slow, args.mem_limit_gb)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

"""The GPU benchmark preset of `make gpu-check` (scripts/gpu_check.py).

Each case is timed in this process with CUDA events (after warm-up, until `min_time` seconds of
steps or `max_iters` steps; the median step), with the peak memory it allocates above its
inputs, and reported as throughput: TFLOP/s of the work a case's model counts and GB/s of the
bytes it must move, each also as a fraction of the device's own measured peaks (a bf16 matmul
for compute, a device-to-device copy for bandwidth). Beside ours run the peers a GPU user would
pick, each optional (absent: reported as such): pytorch-metric-learning, liger-kernel (cross
entropy, fused linear cross entropy), cut-cross-entropy (linear cross entropy), inf-cl
(single-positive contrastive), torch.linalg.solve, and the GEMM floors.

The providers of our losses and of the PyTorch baselines are the suite's (structloss_fast/bench/
<family>.py); the GPU-only peers are defined here. `cases()` lists the preset (the dry run of
`make gpu-check` prints it and runs each case's providers at tiny sizes on the CPU, so that the
preset cannot rot); `run()` measures it on a GPU and writes one JSON line per measurement.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import time
import traceback
from typing import Callable, Optional

import torch

from . import get_case


@dataclasses.dataclass
class PresetCase:
    name: str
    description: str
    size: dict                      # the GPU size (the targets')
    tiny: dict                      # the dry run's CPU size
    providers: dict                 # name -> setup(size, device) -> run
    flops: Optional[Callable[[dict], float]] = None   # work counted for TFLOP/s
    bytes: Optional[Callable[[dict], float]] = None   # bytes counted for GB/s
    target: str = ""                # the target this case measures, in words
    gpu_only: tuple = ()            # providers that need CUDA (peers on Triton/CUDA)
    needs: dict = dataclasses.field(default_factory=dict)  # provider -> module it imports


def _suite(case_key: str, provider: str):
    return get_case(case_key).providers[provider]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------- peers defined here


def _inf_cl(size, device):
    from inf_cl import cal_flash_loss

    q, k = _two_views(size, device)

    def run():
        qn = torch.nn.functional.normalize(q, dim=1)
        kn = torch.nn.functional.normalize(k, dim=1)
        cal_flash_loss(qn, kn, scale=1.0 / size["t"]).mean().backward()
        q.grad = k.grad = None

    return run


def _two_views(size, device):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, size.get("dtype", "float32"))
    q = torch.randn(size["B"], size["D"], generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    k = torch.randn(size["B"], size["D"], generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return q, k


def _ours_single_positive(size, device):
    import structloss_fast as slf

    q, k = _two_views(size, device)
    labels = torch.arange(size["B"], device=device)

    def run():
        slf.supcon_loss(q, labels, ref_embeddings=k, ref_labels=labels, temperature=size["t"]).backward()
        q.grad = k.grad = None

    return run


def _liger_ce(size, device):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    from .softmax import logits_batch

    x, y = logits_batch(size, device)
    loss = LigerCrossEntropyLoss()

    def run():
        loss(x, y).backward()
        x.grad = None

    return run


def _liger_flce(size, device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from .softmax import linear_batch

    x, W, b, y = linear_batch(size, device)
    loss = LigerFusedLinearCrossEntropyLoss()

    def run():
        loss(W, x, y, b).backward()
        x.grad = W.grad = b.grad = None

    return run


def _cce(size, device):
    from cut_cross_entropy import linear_cross_entropy

    from .softmax import linear_batch

    x, W, _, y = linear_batch(size, device)

    def run():
        linear_cross_entropy(x, W, y).backward()
        x.grad = W.grad = None

    return run


def _gemm_floor(size, device):
    """The three products of a fused linear forward+backward at full size (logits, dX, dW),
    in the inputs' dtype: the time no fused linear loss can beat on this GPU."""
    from .softmax import linear_batch

    x, W, _, _ = linear_batch(size, device)
    x, W = x.detach(), W.detach()
    logits = torch.empty(x.shape[0], W.shape[0], device=device, dtype=x.dtype)
    gx, gw = torch.empty_like(x), torch.empty_like(W)

    def run():
        torch.mm(x, W.t(), out=logits)
        torch.mm(logits, W, out=gx)
        torch.mm(logits.t(), x, out=gw)

    return run


# ---------------------------------------------------------------- the preset


def _pair_flops(size: dict) -> float:
    """The three B x B x D products of a forward + backward (the GEMM floor's work)."""
    return 3 * 2.0 * size["B"] ** 2 * size["D"]


def _pairwise_cases() -> list[PresetCase]:
    out = []
    for name, case_key, what in (("circle", "pairwise/circle_loss_bf16", "Circle loss (m=0.4, gamma=80)"),
                                 ("supcon", "pairwise/supcon_loss", "SupCon (t=0.1)")):
        ours = _suite(case_key, "structloss_fast")
        out.append(PresetCase(
            f"{name}_bf16", f"{what}, bf16, D=256, fwd+bwd",
            size={"B": 65536, "D": 256, "dtype": "bfloat16"}, tiny={"B": 64, "D": 32},
            providers={"structloss_fast": ours, "mm_floor": _suite("pairwise/circle_loss", "mm_floor")},
            flops=_pair_flops, target="within 2x of the three-GEMM floor (mm_floor), memory O(B*D)"))
        out.append(PresetCase(
            f"{name}_bf16_vs_pml", f"{what}, bf16, B=16384, D=256, fwd+bwd, beside PML",
            size={"B": 16384, "D": 256, "dtype": "bfloat16"}, tiny={"B": 64, "D": 32},
            providers={"structloss_fast": ours, "pml": _suite(case_key, "pml")},
            flops=_pair_flops, target="at least 50x faster than PML", needs={"pml": "pytorch_metric_learning"}))
    return out


def cases() -> list[PresetCase]:
    bf16 = "bfloat16"
    return [
        *_pairwise_cases(),
        PresetCase(
            "single_positive_contrastive", "two views, one positive each (CLIP-style), t=0.07, D=256",
            size={"B": 32768, "D": 256, "t": 0.07, "dtype": "float32"}, tiny={"B": 32, "D": 32, "t": 0.07},
            providers={"structloss_fast": _ours_single_positive, "inf_cl": _inf_cl},
            flops=_pair_flops, gpu_only=("inf_cl",), needs={"inf_cl": "inf_cl"}),
        PresetCase(
            "encouraging_loss", "Encouraging Loss, bf16 logits N=8192, C=128000, fwd+bwd",
            size={"N": 8192, "C": 128000, "dtype": bf16}, tiny={"N": 16, "C": 100},
            providers={"structloss_fast": _suite("softmax/encouraging_loss", "structloss_fast"),
                       "structloss_fast:ce": _suite("softmax/encouraging_loss", "structloss_fast:ce"),
                       "liger_ce": _liger_ce,
                       "torch_cross_entropy": _suite("softmax/encouraging_loss", "torch_cross_entropy")},
            bytes=lambda s: 2.0 * s["N"] * s["C"] * 2,
            target="80% of copy bandwidth for one read of the logits and one write of the gradient; "
                   "structloss_fast:ce no slower than liger_ce",
            gpu_only=("liger_ce",), needs={"liger_ce": "liger_kernel"}),
        PresetCase(
            "linear_encouraging_loss", "fused linear + EL, bf16, N=8192, H=4096, C=128000, fwd+bwd",
            size={"N": 8192, "H": 4096, "C": 128000, "dtype": bf16}, tiny={"N": 16, "H": 8, "C": 100},
            providers={"structloss_fast": _suite("softmax/linear_encouraging_loss", "structloss_fast"),
                       "structloss_fast:ce": _suite("softmax/linear_encouraging_loss", "structloss_fast:ce"),
                       "liger_flce": _liger_flce, "cut_cross_entropy": _cce,
                       "gemm_floor": _gemm_floor},
            flops=lambda s: 3 * 2.0 * s["N"] * s["H"] * s["C"],
            target="at most 1.1x its three GEMMs (gemm_floor), memory no more than cut-cross-entropy's; "
                   "structloss_fast:ce no slower than liger_flce",
            gpu_only=("liger_flce", "cut_cross_entropy"),
            needs={"liger_flce": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}),
        PresetCase(
            "sgld_step", "one SGLD step in place, x (4096, 3, 32, 32) fp32",
            size={"B": 4096}, tiny={"B": 2},
            providers={name: p for name, p in get_case("jem/sgld_step").providers.items()},
            bytes=lambda s: 3.0 * s["B"] * 3 * 32 * 32 * 4, target="80% of copy bandwidth"),
        PresetCase(
            "cg_dense", "batched dense CG, 4096 systems of n=64, fp32, rtol 1e-6",
            size={"S": 4096, "n": 64, "dtype": "float32"}, tiny={"S": 4, "n": 8, "dtype": "float32"},
            providers={"structloss_fast": _suite("taskmet/cg_dense", "structloss_fast"),
                       "torch.linalg.solve": _suite("taskmet/cg_dense", "torch.linalg.solve")},
            target="at least 3x torch.linalg.solve"),
        PresetCase(
            "seal_nce", "SEAL NCE ranking loss, bibtex sizes (L=159, H=200, K=20), fwd+bwd",
            size=_seal_size(4096), tiny=_seal_size(4),
            providers={name: p for name, p in get_case("seal/nce_scoring").providers.items()}),
    ]


def _seal_size(B: int) -> dict:
    size = dict(get_case("seal/nce_scoring").sizes[0])
    size["B"] = B
    return size


def describe() -> list[str]:
    """The preset's case list (what the dry run prints)."""
    lines = []
    for c in cases():
        peers = ", ".join(p + (f" [needs {c.needs[p]}]" if p in c.needs else "") for p in c.providers)
        model = []
        if c.flops:
            model.append(f"{c.flops(c.size) / 1e12:.2f} TFLOP")
        if c.bytes:
            model.append(f"{c.bytes(c.size) / 1e9:.2f} GB")
        lines.append(f"{c.name}: {c.description}; size {c.size}; providers {peers}"
                     + (f"; counted {' / '.join(model)}" if model else "")
                     + (f"; target: {c.target}" if c.target else ""))
    return lines


# ---------------------------------------------------------------- measurement


def time_cuda(fn, min_time: float, max_iters: int, warmup: int = 2) -> list[float]:
    """Seconds per step, each step between two CUDA events (after `warmup` steps)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_time and len(times) < max_iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _matmul_seconds(device, n: int, min_time: float) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return statistics.median(time_cuda(lambda: torch.mm(a, b, out=out), min_time, 50))


def _copy_seconds(device, nbytes: int, min_time: float) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return statistics.median(time_cuda(lambda: dst.copy_(src), min_time, 50))


def measured_peaks(device, min_time: float = 0.3) -> dict:
    """The device's own peaks: a bf16 8192^3 matmul (TFLOP/s) and a 1 GiB device copy (GB/s,
    read + write)."""
    n, nbytes = 8192, 1 << 30
    t_mm = _matmul_seconds(device, n, min_time)
    t_copy = _copy_seconds(device, nbytes, min_time)
    torch.cuda.empty_cache()
    return {"matmul_bf16_tflops": 2.0 * n ** 3 / t_mm / 1e12, "copy_gbs": 2.0 * nbytes / t_copy / 1e9}


def measure(case: PresetCase, provider: str, device, size: dict, min_time: float, max_iters: int,
            peaks: Optional[dict]) -> dict:
    rec = {"case": case.name, "provider": provider, "size": size, "device": str(device)}
    module = case.needs.get(provider)
    if module is not None and not _has(module):
        rec["status"] = f"absent: {module} is not installed"
        return rec
    if device.type != "cuda" and provider in case.gpu_only:
        rec["status"] = "GPU-only peer"
        return rec
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run = case.providers[provider](size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            times = time_cuda(run, min_time, max_iters)
            rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
        else:  # the dry run: the code path, not a figure
            t0 = time.perf_counter()
            run()
            times = [time.perf_counter() - t0]
        t = statistics.median(times)
        rec.update(status="ok", seconds=t, steps=len(times), spread=[min(times), max(times)])
        if case.flops:
            rec["tflops"] = case.flops(size) / t / 1e12
            if peaks:
                rec["fraction_of_matmul_peak"] = rec["tflops"] / peaks["matmul_bf16_tflops"]
        if case.bytes:
            rec["gbs"] = case.bytes(size) / t / 1e9
            if peaks:
                rec["fraction_of_copy_peak"] = rec["gbs"] / peaks["copy_gbs"]
    except torch.cuda.OutOfMemoryError as exc:
        rec["status"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the preset
        rec["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        rec["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return rec


def run(out_jsonl: str, *, device: str = "cuda", tiny: bool = False, min_time: float = 0.3, max_iters: int = 30,
        only: Optional[list[str]] = None) -> list[dict]:
    """Measure the preset (tiny: each provider once at the case's tiny size, e.g. on the CPU) and
    append one JSON line per measurement to out_jsonl as it completes (a time limit that stops
    the run keeps what was measured)."""
    dev = torch.device(device)
    records = []
    with open(out_jsonl, "a") as f:
        peaks = None
        if dev.type == "cuda":
            peaks = measured_peaks(dev)
            rec = {"case": "peaks", "status": "ok", **peaks, "gpu": torch.cuda.get_device_name(dev)}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            records.append(rec)
        for case in cases():
            if only and case.name not in only:
                continue
            for provider in case.providers:
                rec = measure(case, provider, dev, case.tiny if tiny else case.size, min_time, max_iters, peaks)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                records.append(rec)
    return records


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m structloss_fast.bench.gpu_preset")
    p.add_argument("--out", required=True, help="JSON lines file (appended)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="each provider once at the tiny sizes (the dry run)")
    p.add_argument("--list", action="store_true", help="print the case list and exit")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--max-iters", type=int, default=30)
    p.add_argument("--case", action="append")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(describe()))
        return 0
    records = run(args.out, device=args.device, tiny=args.tiny, min_time=args.min_time, max_iters=args.max_iters,
                  only=args.case)
    bad = [r for r in records if r["status"] != "ok" and not r["status"].startswith(("absent", "GPU-only"))]
    for r in records:
        print(f"{r['case']:<30} {r.get('provider', ''):<26} {r['status'][:80]}")
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""`python -m structloss_fast bench`: run the suite, print a table, write JSON/CSV and a plot."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

from . import FAMILIES, Case, load_cases, size_label


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:  # the version without importing triton (the runner forks its measurements)
        import importlib.metadata

        info["triton"] = importlib.metadata.version("triton")
    except Exception:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_label(info: dict) -> str:
    if info.get("gpu"):
        return f"{info['gpu']} (host: {info['cpu']}, torch {info['torch']})"
    return f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, torch {info['torch']}"


def run_forked(case: Case, provider: str, size: dict, device: str, args) -> dict:
    """The measurement in a child forked from this process, which has imported torch and the
    package but run nothing (no thread pool, no allocator state): a fresh process without the
    seconds of interpreter start-up and imports."""
    import select
    import signal

    from . import worker

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            res = worker.run_measurement(case.key, provider, size, device, args.min_time, 30, 8.0, args.mem_limit_gb)
            data = json.dumps(res).encode()
            while data:
                data = data[os.write(wfd, data):]
        except BaseException:  # noqa: BLE001 - the child must never return into the runner
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks, deadline = [], time.monotonic() + args.timeout
    timed_out = False
    with os.fdopen(rfd, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([pipe], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"status": f"timed out after {args.timeout:g} s"}
    if not chunks:
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return {"status": "killed (out of memory?)" if killed else f"failed: child exit status {status}"}
    return json.loads(b"".join(chunks))


def run_one(case: Case, provider: str, size: dict, device: str, args) -> dict:
    if args.isolation == "fork" and device == "cpu" and hasattr(os, "fork"):
        return run_forked(case, provider, size, device, args)
    cmd = [
        sys.executable, "-m", "structloss_fast.bench.worker",
        "--case", case.key, "--provider", provider, "--size", json.dumps(size), "--device", device,
        "--min-time", str(args.min_time), "--mem-limit-gb", str(args.mem_limit_gb),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout:g} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        killed = proc.returncode in (-9, 137)
        return {"status": "killed (out of memory?)" if killed else f"failed: exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_mem(b):
    if b is None:
        return "-"
    if b < 2**20:
        return f"{b / 2**10:.0f} KB"
    if b < 2**30:
        return f"{b / 2**20:.1f} MB"
    return f"{b / 2**30:.2f} GB"


def add_ratios(rows: list[dict], cases: dict[str, Case]) -> None:
    """speedup = best peer time / our time; mem_ratio = our peak / best peer's peak."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["size"]), []).append(r)
    for (case_key, _), group in groups.items():
        case = cases[case_key]
        peers = [r for r in group if r["provider"] not in case.ours and r["provider"] not in case.reference_points
                 and r.get("status") == "ok"]
        best_t = min((r["time_s"] for r in peers), default=None)
        best_m = min((r["peak_mem_bytes"] for r in peers), default=None)
        for r in group:
            if r.get("status") != "ok":
                continue
            if best_t:
                r["speedup_vs_best_peer"] = best_t / r["time_s"]
            if best_m:
                r["mem_vs_best_peer"] = r["peak_mem_bytes"] / best_m if best_m > 0 else None


def print_table(rows: list[dict], cases: dict[str, Case], out=sys.stdout) -> None:
    current = None
    header = f"{'size':<22} {'provider':<22} {'time':>10} {'peak mem':>10} {'speedup':>9} {'mem ratio':>10}"
    for r in rows:
        if r["case"] != current:
            current = r["case"]
            case = cases[current]
            print(f"\n## {current} ({case.mode}): {case.description}", file=out)
            print(header, file=out)
            print("-" * len(header), file=out)
        if r.get("status") == "ok":
            sp = r.get("speedup_vs_best_peer")
            mr = r.get("mem_vs_best_peer")
            print(f"{r['size']:<22} {r['provider']:<22} {fmt_time(r['time_s']):>10} {fmt_mem(r['peak_mem_bytes']):>10} "
                  f"{(f'{sp:.1f}x' if sp else '-'):>9} {(f'{mr:.3f}' if mr is not None else '-'):>10}", file=out)
        else:
            print(f"{r['size']:<22} {r['provider']:<22} {r['status']}", file=out)
    print("\nspeedup: best peer's time / this time; mem ratio: this peak / best peer's peak "
          "(peers exclude structloss_fast and reference points such as GEMM floors)", file=out)


def plot_groups(rows: list[dict], metric: str) -> tuple[list[str], list[str], dict]:
    """What one panel of a case draws: the sizes, the providers that have a result in the case
    (skipped and failed ones are left out, of the bars and of the legend), and per (provider,
    size) the value and its height on a linear axis relative to the largest value at that size
    (sizes of one case differ by orders of magnitude: each size group spans the axis)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get(metric) is not None]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    values = {(r["provider"], r["size"]): r[metric] for r in ok}
    top = {s: max((v for (p, sz), v in values.items() if sz == s), default=0.0) for s in sizes}
    return sizes, providers, {k: (v, v / top[k[1]] if top[k[1]] > 0 else 0.0) for k, v in values.items()}


def plot(rows: list[dict], cases: dict[str, Case], path: str, title: str) -> bool:
    """One row of two panels per case (time, peak memory): bars on a linear axis, each size group
    scaled to its largest value, every bar labelled with its measured value."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    keys = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(len(keys), 2, figsize=(14, 3.6 * len(keys)), squeeze=False)
    panels = (("time_s", fmt_time, "time / slowest at this size"),
              ("peak_mem_bytes", fmt_mem, "peak extra memory / largest at this size"))
    for i, key in enumerate(keys):
        sub = [r for r in rows if r["case"] == key]
        for ax, (metric, fmt, ylabel) in zip(axes[i], panels):
            sizes, providers, bars = plot_groups(sub, metric)
            width = 0.8 / max(len(providers), 1)
            for j, prov in enumerate(providers):
                xs, hs, labels = [], [], []
                for k, size in enumerate(sizes):
                    if (prov, size) in bars:
                        value, height = bars[(prov, size)]
                        xs.append(k + j * width)
                        hs.append(height)
                        labels.append(fmt(value))
                drawn = ax.bar(xs, hs, width, label=prov)
                ax.bar_label(drawn, labels=labels, fontsize=6, rotation=90, padding=2)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))])
            ax.set_xticklabels(sizes, fontsize=7)
            ax.set_ylim(0, 1.45)  # room for the rotated labels
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(key, fontsize=9)
            if not providers:
                ax.text(0.5, 0.5, "no result", ha="center", va="center", transform=ax.transAxes)
        if any(ax.get_legend_handles_labels()[0] for ax in axes[i]):
            # One legend per case, beside its two panels, clear of the bars and their labels.
            axes[i][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def default_out_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("bench", "results", "local") if os.path.isdir("bench") else "structloss_fast_bench"
    return os.path.join(base, stamp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m structloss_fast bench",
                                 description="Time and peak memory of structloss_fast against its peers.")
    ap.add_argument("--family", action="append", choices=FAMILIES, help="run only these families (repeatable)")
    ap.add_argument("--case", action="append", help="run only these cases, e.g. pairwise/circle_loss (repeatable)")
    ap.add_argument("--provider", action="append", help="run only these providers (repeatable)")
    ap.add_argument("--full", action="store_true", help="the target sizes of every case (slow: minutes per case)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="results directory (default bench/results/local/<time>)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    ap.add_argument("--isolation", choices=("fork", "spawn"), default="fork",
                    help="each measurement in a child forked from the runner (CPU; no start-up cost) or in a "
                         "new interpreter (always for CUDA)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a measurement is abandoned")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="data-segment cap per CPU measurement")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)

    families = tuple(args.family) if args.family else FAMILIES
    cases = load_cases(families)
    selected = [c for c in cases.values() if (not args.case or c.key in args.case) and args.device in c.devices]
    if args.list:
        for c in cases.values():
            print(f"{c.key:<36} providers: {', '.join(c.providers)}")
            print(f"{'':<36} default sizes: {'; '.join(size_label(s) for s in c.sizes)}")
            print(f"{'':<36} --full sizes:  {'; '.join(size_label(s) for s in c.full_sizes)}")
        return 0
    if not selected:
        print("no benchmark case selected", file=sys.stderr)
        return 2

    info = machine_info(args.device)
    if args.isolation == "fork":
        # Imported once here, inherited by every forked measurement.
        import structloss_fast  # noqa: F401

        try:
            import pytorch_metric_learning.losses  # noqa: F401
        except ImportError:
            pass
    print(f"structloss_fast bench on {machine_label(info)}; device={args.device}; "
          f"{'full' if args.full else 'default'} sizes", flush=True)
    rows = []
    t_start = time.time()
    for case in selected:
        sizes = case.full_sizes if args.full and case.full_sizes else case.sizes
        for size in sizes:
            for provider in case.providers:
                if args.provider and provider not in args.provider:
                    continue
                label = size_label(size)
                reason = case.skip_reason(provider, size, args.device)
                if reason:
                    res = {"status": f"skipped: {reason}"}
                else:
                    print(f"  {case.key:<30} {label:<22} {provider:<22}", end=" ", flush=True)
                    res = run_one(case, provider, size, args.device, args)
                    print(fmt_time(res.get("time_s")) if res.get("status") == "ok" else res["status"], flush=True)
                rows.append({"case": case.key, "family": case.family, "size": label, "size_params": size,
                             "provider": provider, "device": args.device, **res})
    add_ratios(rows, cases)
    print_table(rows, cases)
    elapsed = time.time() - t_start

    out = args.out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    meta = {"machine": info, "machine_label": machine_label(info), "full": args.full,
            "command": "python -m structloss_fast bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "elapsed_s": elapsed, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    fields = ["case", "size", "provider", "device", "status", "time_s", "time_min_s", "time_q25_s", "time_q75_s",
              "repeats", "peak_mem_bytes", "speedup_vs_best_peer", "mem_vs_best_peer"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(f"{meta['command']}\n{meta['machine_label']}\n{meta['date']}\n")
        print_table(rows, cases, out=f)
    plotted = plot(rows, cases, os.path.join(out, "results.png"), machine_label(info))
    print(f"\nwrote {out}/results.json, results.csv, results.txt" + (", results.png" if plotted else "")
          + f" ({elapsed:.0f} s)")
    failed = [r for r in rows if r["status"].startswith("failed") and r["provider"] in cases[r["case"]].ours]
    return 1 if failed else 0

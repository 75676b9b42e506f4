#!/usr/bin/env python3
"""`make gpu-check`: check the whole GPU side of structloss_fast on this machine, in one command.

On a machine with a CUDA GPU (torch >= 2.11, triton >= 3.6, nvcc; no network needed) it runs,
each phase under its own time limit so that a failure or a hang in one still returns the others:

  env      versions, the GPU, `python -m structloss_fast info`                  info.txt
  wheels   the optional peers installed offline from a wheel directory          wheels.json
           (pip --no-index --find-links DIR --target RESULTS/peers; an absent
           wheel makes that peer absent, not a failure)
  build    the extension built in place for this GPU's architecture             build.log
  kernels  every Triton configuration compiled for this GPU and for sm_90:      kernels.json, kernels.txt
           shared memory against the limit, registers, spills
  tests    `pytest -m gpu` in parallel shards, a time limit per test            junit.xml, tests.txt
  bench    the GPU preset (structloss_fast/bench/gpu_preset.py): CUDA events,   bench.json, bench.txt, *.png
           TFLOP/s and GB/s against the device's measured matmul and copy
           peaks, beside the peers

and writes everything to one results directory, ending with summary.txt whose last line is
`N passed, N failed`. Without a GPU (or with --dry-run) it runs the dry run instead and says so:
the configuration tables (check_supported derived from them), the sm_90 ahead-of-time compiles,
the preset's case list (each provider run once at a tiny size on the CPU) and the wheel
installation (resolved for Python 3.12, installed nowhere). CI runs the dry run.

    python scripts/gpu_check.py [--out DIR] [--wheels DIR] [--dry-run] [--phases a,b] [--budget S]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The peers (and what the test run imports) that travel as wheels: `make gpu-wheels` downloads
# them for Python 3.12 (pip download --only-binary=:all: --python-version 3.12 --no-deps).
PEERS = {  # distribution -> module
    "pytorch-metric-learning": "pytorch_metric_learning",
    "liger-kernel": "liger_kernel",
    "cut-cross-entropy": "cut_cross_entropy",
    "inf-cl": "inf_cl",
}
# Imported by a peer or by the test run, and often missing on a bare GPU image.
SUPPORT = {"tqdm": "tqdm", "scipy": "scipy", "scikit-learn": "sklearn", "hypothesis": "hypothesis",
           "sortedcontainers": "sortedcontainers", "attrs": "attr", "expecttest": "expecttest",
           "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "ninja": "ninja"}

# Seconds per phase: on a GPU they add up to 8 minutes (the run must fit them on an H100/H200).
GPU_LIMITS = {"env": 20, "wheels": 30, "build": 150, "kernels": 60, "tests": 120, "bench": 100}
DRY_LIMITS = {"env": 20, "wheels": 30, "table": 30, "kernels": 150, "preset": 60}


def now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


class Phase:
    """One phase's outcome: items passed / failed / skipped, and what it wrote."""

    def __init__(self, name: str, limit: float):
        self.name, self.limit = name, limit
        self.passed = self.failed = self.skipped = 0
        self.notes: list[str] = []
        self.status = "not run"
        self.seconds = 0.0

    def as_dict(self):
        return {k: getattr(self, k) for k in ("name", "limit", "status", "seconds", "passed", "failed", "skipped",
                                              "notes")}


def run_cmd(cmd, log_path, timeout, env=None, cwd=ROOT) -> tuple[int, bool]:
    """(exit status, timed out): cmd's output to log_path; the whole process group is killed at
    the time limit."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            log.write(f"\n[gpu_check] killed at the {timeout:.0f} s time limit\n")
            return -9, True


def base_env(peers_dir=None) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    paths = [ROOT] + ([peers_dir] if peers_dir and os.path.isdir(peers_dir) else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def gpu_present(py: str) -> tuple[bool, str]:
    code = ("import torch; ok = torch.cuda.is_available(); "
            "print(ok, torch.cuda.get_device_name(0) if ok else '', "
            "'%d%d' % torch.cuda.get_device_capability(0) if ok else '')")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60, env=base_env()).stdout.split()
    except Exception as exc:  # noqa: BLE001
        return False, f"torch did not load: {exc}"
    if not out or out[0] != "True":
        return False, "no CUDA device visible to torch"
    return True, " ".join(out[1:])


# ---------------------------------------------------------------- phases


def phase_env(ph: Phase, out: str, py: str, gpu: bool):
    path = os.path.join(out, "info.txt")
    code = ("import platform, sys, torch\n"
            "print('python', sys.version.split()[0], platform.platform())\n"
            "print('torch', torch.__version__, 'cuda', torch.version.cuda)\n"
            "try:\n import triton; print('triton', triton.__version__)\n"
            "except Exception as e: print('triton absent:', e)\n"
            "print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')\n")
    rc, _ = run_cmd([py, "-c", code], path, ph.limit / 3, base_env())
    if gpu and shutil.which("nvidia-smi"):
        run_cmd(["nvidia-smi"], path, 20)
    if shutil.which("nvcc"):
        run_cmd(["nvcc", "--version"], path, 20)
    rc2, _ = run_cmd([py, "-m", "structloss_fast", "info"], path, ph.limit / 2, base_env())
    ph.passed += rc == 0
    ph.failed += rc != 0
    ph.notes.append("structloss_fast info " + ("ran" if rc2 == 0 else f"exited {rc2} (the extension may not be built yet)"))


def _wheel_dist(path: str) -> str:
    return os.path.basename(path).split("-")[0].replace("_", "-").lower()


def phase_wheels(ph: Phase, out: str, py: str, wheels: str, install: bool):
    report = {"directory": wheels, "wheels": [], "peers": {}}
    found = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels and os.path.isdir(wheels) else []
    report["wheels"] = [os.path.basename(w) for w in found]
    dists = {_wheel_dist(w): w for w in found}
    log = os.path.join(out, "wheels.log")
    wanted = {d: m for d, m in {**PEERS, **SUPPORT}.items() if d.replace("_", "-") in dists}
    target = os.path.join(out, "peers")
    if wanted:
        cmd = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links", wheels,
               "--no-deps", "--target", target]
        if not install:  # the dry run: resolve for the GPU machine's Python, install nowhere
            cmd += ["--dry-run", "--only-binary=:all:", "--python-version", "3.12", "--report",
                    os.path.join(out, "wheels-report.json")]
        rc, timed_out = run_cmd(cmd + sorted(wanted), log, ph.limit)
        report["pip_exit"] = rc
        if rc != 0:
            ph.failed += 1
            ph.notes.append(f"pip {'timed out' if timed_out else f'exited {rc}'} (see wheels.log)")
        else:
            ph.passed += 1
    for dist, module in PEERS.items():
        if dist not in dists:
            report["peers"][dist] = "absent (no wheel): optional, its benchmark rows are skipped"
            ph.skipped += 1
            continue
        if not install:
            report["peers"][dist] = f"wheel {os.path.basename(dists[dist])} resolves for Python 3.12"
            continue
        env = base_env(target)
        probe = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=120)
        report["peers"][dist] = "importable" if probe.returncode == 0 else \
            f"installed, import fails (optional): {probe.stderr.strip().splitlines()[-1:]}"
    with open(os.path.join(out, "wheels.json"), "w") as f:
        json.dump(report, f, indent=1)
    ph.notes.append(f"{len(found)} wheels in {wheels or '(none given)'}; peers: "
                    + ", ".join(f"{d}: {s.split(' (')[0]}" for d, s in report["peers"].items()))


def phase_build(ph: Phase, out: str, py: str, arch: str):
    env = base_env()
    env["FORCE_CUDA"] = "1"
    env["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}" if arch else env.get("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    rc, timed_out = run_cmd([py, "setup.py", "build_ext", "--inplace"], os.path.join(out, "build.log"), ph.limit, env)
    check = subprocess.run([py, "-c", "from structloss_fast import _ext; import sys; "
                            "sys.exit(0 if _ext.extension_loaded() and _ext.has_kernel('pairwise_loss', 'CUDA') else 1)"],
                           env=env, capture_output=True, timeout=120)
    ok = rc == 0 and check.returncode == 0
    ph.passed += ok
    ph.failed += not ok
    ph.notes.append("built for sm_" + arch if ok else
                    ("timed out" if timed_out else f"failed (exit {rc}; CUDA kernels loaded: {check.returncode == 0})"))


def phase_kernels(ph: Phase, out: str, py: str, archs: list[str], full: bool):
    records_all = []
    for arch in archs:
        path = os.path.join(out, f"kernels-sm{arch}.json")
        cmd = [py, "-m", "structloss_fast._aot", "--arch", arch, "--json", path,
               "--jobs", str(min(os.cpu_count() or 1, 16)), "--timeout", str(max(10, ph.limit / len(archs) - 10))]
        rc, timed_out = run_cmd(cmd + (["--full"] if full else []), os.path.join(out, "kernels.txt"),
                                ph.limit / len(archs), base_env())
        if timed_out or not os.path.exists(path):
            ph.failed += 1
            ph.notes.append(f"sm_{arch}: {'timed out' if timed_out else f'exited {rc} without a report'}")
            continue
        with open(path) as f:
            data = json.load(f)
        recs = data["records"]
        sys.path.insert(0, ROOT)
        from structloss_fast import _aot  # the checks, by the same code as the tests

        bad = [r for r in recs if _aot.check(r, data["shared_limit"])]
        ph.passed += len(recs) - len(bad)
        ph.failed += len(bad)
        spills = [r for r in recs if r.get("stack")]
        ph.notes.append(f"sm_{arch}: {len(recs)} kernels, {len(bad)} problems, {len(spills)} with a stack (spilled registers), "
                        f"max shared {max((r.get('shared', 0) for r in recs), default=0)} of {data['shared_limit']} bytes")
        records_all += [dict(r, arch=arch) for r in recs]
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(records_all, f, indent=1)


def phase_table(ph: Phase, out: str, py: str):
    """The configuration tables and the check that check_supported is derived from them."""
    code = r"""
import importlib, json, sys, torch
from structloss_fast._triton_support import table_rows, pick
rows, bad = [], []
for fam in ("pairwise", "softmax", "seal"):
    m = importlib.import_module(f"structloss_fast.{fam}._triton")
    rows.append(f"[{fam}] GPU_TABLE")
    rows += ["  " + r for r in table_rows(m.GPU_TABLE)]
    dev = torch.device("meta")
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for size in (1, 15, 16, 17, 64, 128, 129, 256, 257, 1000, 4096, 4097, 100000):
            e = pick(m.GPU_TABLE, dtype, size)
            if e is None and not (fam == "seal" and dtype in (torch.bfloat16, torch.float16)):
                bad.append(f"{fam}: no entry for {dtype} at size {size}")
print("\n".join(rows))
print("\n".join(bad) or "every dtype and size has an entry")
sys.exit(1 if bad else 0)
"""
    rc, timed_out = run_cmd([py, "-c", code], os.path.join(out, "table.txt"), ph.limit, base_env())
    ph.passed += rc == 0
    ph.failed += rc != 0
    ph.notes.append("tables cover every dtype and size" if rc == 0 else "see table.txt")


def _merge_junit(paths, dest) -> tuple[int, int, int]:
    suites = ET.Element("testsuites")
    passed = failed = skipped = 0
    for p in paths:
        try:
            root = ET.parse(p).getroot()
        except (ET.ParseError, OSError):
            continue
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            suites.append(suite)
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed += 1
                elif case.find("skipped") is not None:
                    skipped += 1
                else:
                    passed += 1
    ET.ElementTree(suites).write(dest, encoding="utf-8", xml_declaration=True)
    return passed, failed, skipped


def phase_tests(ph: Phase, out: str, py: str, shards: int, per_test: float, peers_dir: str):
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True))
    files = [os.path.relpath(f, ROOT) for f in files]
    groups = [files[i::shards] for i in range(shards)]
    procs = []
    env = base_env(peers_dir)
    for i, group in enumerate(groups):
        if not group:
            continue
        xml = os.path.join(out, f"junit-{i}.xml")
        log = open(os.path.join(out, f"tests-{i}.txt"), "w")
        cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               f"--test-time-limit={per_test}", *group]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                       start_new_session=True), xml, log))
    deadline = time.monotonic() + ph.limit
    timed_out = 0
    for proc, _, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            timed_out += 1
        log.close()
    with open(os.path.join(out, "tests.txt"), "w") as f:
        for i in range(len(groups)):
            p = os.path.join(out, f"tests-{i}.txt")
            if os.path.exists(p):
                f.write(f"==== shard {i}\n" + open(p).read())
    passed, failed, skipped = _merge_junit([x for _, x, _ in procs], os.path.join(out, "junit.xml"))
    ph.passed, ph.failed, ph.skipped = passed, failed + timed_out, skipped
    ph.notes.append(f"{passed} passed, {failed} failed, {skipped} skipped in {len(procs)} shards"
                    + (f"; {timed_out} shards killed at the phase limit" if timed_out else ""))


def phase_bench(ph: Phase, out: str, py: str, peers_dir: str, tiny: bool):
    jsonl = os.path.join(out, "bench.jsonl")
    cmd = [py, "-m", "structloss_fast.bench.gpu_preset", "--out", jsonl]
    if tiny:
        cmd += ["--tiny", "--device", "cpu"]
    run_cmd(cmd, os.path.join(out, "bench.log"), ph.limit, base_env(peers_dir))
    recs = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(recs, f, indent=1)
    for r in recs:
        s = r.get("status", "")
        if s == "ok":
            ph.passed += 1
        elif s.startswith(("absent", "GPU-only")):
            ph.skipped += 1
        else:
            ph.failed += 1
    write_bench_text(recs, os.path.join(out, "bench.txt"))
    if not tiny:
        plot_bench(recs, out)
    ph.notes.append(f"{len(recs)} measurements" + (" (tiny sizes on the CPU: code paths, not figures)" if tiny else ""))


def write_bench_text(recs, path):
    lines = []
    peaks = next((r for r in recs if r.get("case") == "peaks"), None)
    if peaks:
        lines.append(f"{peaks.get('gpu', '')}: measured peaks {peaks['matmul_bf16_tflops']:.0f} TFLOP/s (bf16 matmul), "
                     f"{peaks['copy_gbs']:.0f} GB/s (device copy)")
    lines.append(f"{'case':<28} {'provider':<26} {'time':>10} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>7} {'%copy':>6} "
                 f"{'memory':>10}  status")
    for r in recs:
        if r.get("case") == "peaks":
            continue
        t = f"{r['seconds'] * 1e3:.2f} ms" if "seconds" in r else "-"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        fm = f"{100 * r['fraction_of_matmul_peak']:.0f}" if "fraction_of_matmul_peak" in r else "-"
        gb = f"{r['gbs']:.0f}" if "gbs" in r else "-"
        fc = f"{100 * r['fraction_of_copy_peak']:.0f}" if "fraction_of_copy_peak" in r else "-"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if "peak_memory_bytes" in r else "-"
        lines.append(f"{r['case']:<28} {r.get('provider', ''):<26} {t:>10} {tf:>8} {fm:>5} {gb:>7} {fc:>6} {mem:>10}  "
                     f"{r.get('status', '')[:60]}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_bench(recs, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        return
    by_case: dict[str, list] = {}
    for r in recs:
        if r.get("status") == "ok" and r.get("case") != "peaks":
            by_case.setdefault(r["case"], []).append(r)
    if not by_case:
        return
    fig, axes = plt.subplots(len(by_case), 1, figsize=(8, 1.6 * len(by_case) + 1), squeeze=False)
    for ax, (case, rows) in zip(axes[:, 0], by_case.items()):
        ax.barh([r["provider"] for r in rows], [r["seconds"] * 1e3 for r in rows])
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("ms per step (median, CUDA events)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench.png"), dpi=110)


# ---------------------------------------------------------------- driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="results directory (default: gpu-check-results/<timestamp>)")
    p.add_argument("--wheels", default=os.environ.get("GPU_WHEELS", os.path.join(ROOT, "gpu_wheels")),
                   help="directory of the peers' wheels (make gpu-wheels)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with torch")
    p.add_argument("--dry-run", action="store_true", help="the dry run even on a GPU machine")
    p.add_argument("--phases", default=None, help="comma-separated subset of the phases")
    p.add_argument("--budget", type=float, default=None, help="scale every phase limit to fit this many seconds")
    p.add_argument("--shards", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    p.add_argument("--test-time-limit", type=float, default=60.0, help="seconds per test")
    p.add_argument("--full-aot", action="store_true", help="compile every loss / flag specialization")
    args = p.parse_args(argv)

    py = args.python
    gpu, gpu_desc = gpu_present(py)
    dry = args.dry_run or not gpu
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.abspath(args.out or os.path.join(ROOT, "gpu-check-results", stamp))
    os.makedirs(out, exist_ok=True)
    limits = dict(DRY_LIMITS if dry else GPU_LIMITS)
    if args.budget:
        scale = args.budget / sum(limits.values())
        limits = {k: v * scale for k, v in limits.items()}
    wanted = args.phases.split(",") if args.phases else list(limits)
    arch = gpu_desc.split()[-1] if gpu and re.fullmatch(r"\d+", gpu_desc.split()[-1] or "") else ""
    mode = "DRY RUN (no GPU: " + (gpu_desc if not gpu else "--dry-run given") + ")" if dry else f"GPU run on {gpu_desc}"
    print(f"[{now()}] gpu-check: {mode}; results in {out}", flush=True)
    peers_dir = os.path.join(out, "peers")
    phases = []
    t_all = time.monotonic()
    for name in limits:
        if name not in wanted:
            continue
        ph = Phase(name, limits[name])
        t0 = time.monotonic()
        print(f"[{now()}] {name} (limit {ph.limit:.0f} s) ...", flush=True)
        try:
            if name == "env":
                phase_env(ph, out, py, gpu)
            elif name == "wheels":
                phase_wheels(ph, out, py, args.wheels, install=not dry)
            elif name == "build":
                phase_build(ph, out, py, arch)
            elif name == "table":
                phase_table(ph, out, py)
            elif name == "kernels":
                archs = ["90"] if dry else sorted({arch, "90"} - {""})
                phase_kernels(ph, out, py, archs, args.full_aot)
            elif name == "tests":
                phase_tests(ph, out, py, args.shards, args.test_time_limit, peers_dir)
            elif name in ("bench", "preset"):
                phase_bench(ph, out, py, peers_dir, tiny=dry)
            ph.status = "failed" if ph.failed else "ok"
        except Exception as exc:  # noqa: BLE001 - a broken phase must not hide the others
            ph.failed += 1
            ph.status = "error"
            ph.notes.append(f"{type(exc).__name__}: {exc}")
        ph.seconds = round(time.monotonic() - t0, 1)
        phases.append(ph)
        print(f"[{now()}] {name}: {ph.status} in {ph.seconds:.0f} s; " + "; ".join(ph.notes), flush=True)
    passed = sum(ph.passed for ph in phases)
    failed = sum(ph.failed for ph in phases)
    skipped = sum(ph.skipped for ph in phases)
    summary = {"mode": "dry-run" if dry else "gpu", "gpu": gpu_desc, "results": out,
               "seconds": round(time.monotonic() - t_all, 1), "passed": passed, "failed": failed, "skipped": skipped,
               "phases": [ph.as_dict() for ph in phases]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"structloss_fast gpu-check: {mode}", f"results: {out}", ""]
    for ph in phases:
        lines.append(f"{ph.name:<8} {ph.status:<7} {ph.seconds:>6.0f} s (limit {ph.limit:.0f} s)  "
                     f"{ph.passed} passed, {ph.failed} failed, {ph.skipped} skipped; " + "; ".join(ph.notes))
    lines += ["", f"total {summary['seconds']:.0f} s; {skipped} skipped", f"{passed} passed, {failed} failed"]
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile of every Triton configuration the dispatcher can choose, for a GPU
that need not be here (sm_90 by default), with what the compiler reports read back.

    python -m structloss_fast._aot [--family F ...] [--full] [--arch 90] [--jobs N] [--json PATH]

For each family's `_triton.aot_configs()` it compiles the kernels as the JIT would specialize
them (Triton's bundled ptxas, no driver needed) and records per kernel: the shared memory the
launch needs (from Triton's metadata), the registers and spill bytes per thread (from ptxas'
report), and every 32-bit product of a runtime size that feeds an address (which overflows
once an offset passes 2^31). It exits non-zero when a kernel does not compile, needs more
shared memory than the architecture's limit, or has such a product. tests/test_triton_build.py
runs it; `make gpu-check` runs it for the local GPU too.

Must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time

# Shared memory per block, opt-in maximum (bytes), by compute capability.
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TRITON_FAMILIES = ("pairwise", "softmax", "seal")

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")
_FLOAT_ARG = re.compile(r"(%[\w]+)\s*:\s*(f16|bf16|f32|f64)\b")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def configs(family: str, full: bool):
    return importlib.import_module(f"structloss_fast.{family}._triton").aot_configs(full)


# ---------------------------------------------------------------- 32-bit address products

_DEF = re.compile(r"^\s*(%[\w#]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_VALUE = re.compile(r"%[\w]+(?:#\d+)?")
_FUNC = re.compile(r"tt\.func\b[^(]*@\w+\((.*)\)\s*(?:attributes|\{)")
_ARG = re.compile(r"(%[\w]+)\s*:\s*(i32|i64)\b")


def _operands(rest: str) -> list[str]:
    rest = rest.split(" loc(")[0]
    return [v.split("#")[0] for v in _VALUE.findall(rest)]


def narrow_address_products(ttir: str) -> list[str]:
    """The 32-bit multiplications in a kernel's TTIR that involve a runtime integer argument
    (a size or a stride) and feed a pointer offset: each overflows once the product passes
    2^31 (e.g. row * stride with B * D >= 2^31). Index arithmetic that scales by a runtime size
    must be 64-bit; products of program ids and block sizes alone are not reported."""
    m = _FUNC.search(ttir)
    if m is None:
        return []
    tainted = {name for name, _ in _ARG.findall(m.group(1))}
    defs: dict[str, tuple[str, list[str], str]] = {}
    for line in ttir.splitlines():
        d = _DEF.match(line)
        if d is None:
            continue
        name, op, rest = d.group(1).split("#")[0], d.group(2), d.group(3)
        ops = _operands(rest)
        defs[name] = (op, ops, line.strip())
        # block arguments bound on this line (scf.for %argN = ..., iter_args(%argM = ...))
        for bound in re.findall(r"(%[\w]+)\s*=", rest):
            defs.setdefault(bound, ("block_arg", ops, line.strip()))
    # forward taint to a fixpoint (loops carry values around)
    changed = True
    while changed:
        changed = False
        for name, (_, ops, _) in defs.items():
            if name not in tainted and any(o in tainted for o in ops):
                tainted.add(name)
                changed = True
    # what feeds a pointer offset
    feeds: set[str] = set()
    stack = []
    for name, (op, ops, _) in defs.items():
        if op == "tt.addptr" and len(ops) >= 2:
            stack.append(ops[1])
    while stack:
        v = stack.pop()
        if v in feeds:
            continue
        feeds.add(v)
        if v in defs and defs[v][0] not in ("block_arg",):
            stack.extend(defs[v][1])
    out = []
    for name, (op, ops, line) in defs.items():
        if op != "arith.muli" or name not in feeds:
            continue
        result_type = line.split(" : ")[-1].split(" loc(")[0]
        if re.search(r"\bi32\b|xi32>", result_type) and any(o in tainted for o in ops):
            out.append(line)
    return out


def float_scalar_arguments(ttir: str) -> list[str]:
    """The kernel's floating-point scalar arguments (name: type). Triton types a Python float
    argument as fp32, so a float64 parameter passed that way loses half its digits: the
    kernels take their parameters as exact int64 bits (structloss_fast._triton_support.f64)."""
    m = _FUNC.search(ttir)
    return [f"{n}: {t}" for n, t in _FLOAT_ARG.findall(m.group(1))] if m else []


# ---------------------------------------------------------------- compile one configuration


def compile_one(cfg, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    names = cfg.kernel.arg_names
    attrs = {(names.index(a),): backend.parse_attr("D") for a in cfg.divisible if a in names}
    signature = dict(cfg.signature, **{k: "constexpr" for k in cfg.constexprs})
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=cfg.constexprs, attrs=attrs)
    rec = {"kernel": cfg.name, "label": cfg.label, "arch": arch, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "constexprs": {k: str(v) for k, v in cfg.constexprs.items()}}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target,
                                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as exc:  # noqa: BLE001 - reported per kernel
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}", seconds=time.perf_counter() - t0)
        return rec
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    ptxas = log.getvalue()
    spills = _PTXAS_SPILLS.findall(ptxas)
    registers, stack = resource_usage(kernel.asm["cubin"])
    rec.update(
        ok=True,
        shared=int(kernel.metadata.shared),
        registers=registers,
        stack=stack,
        spill_stores=int(spills[-1][0]) if spills else None,  # None: taken from the cache (see stack)
        spill_loads=int(spills[-1][1]) if spills else None,
        narrow_products=narrow_address_products(kernel.asm["ttir"]),
        float_scalars=float_scalar_arguments(kernel.asm["ttir"]),
        target=f"sm_{arch}" if f".target sm_{arch}" in kernel.asm["ptx"] else "unexpected",
        wgmma="wgmma" in kernel.asm["ptx"],
    )
    return rec


def resource_usage(cubin: bytes) -> tuple:
    """(registers, stack bytes) per thread from cuobjdump -res-usage (Triton bundles it): read
    from the binary, so they are known for a kernel taken from Triton's cache too (ptxas' own
    report, with the spill bytes, only comes with a fresh compile). Spilled registers live on
    the stack."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    m = _RES_USAGE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def check(rec: dict, limit: int) -> list[str]:
    """What is wrong with one compiled kernel (empty: nothing)."""
    if not rec.get("ok"):
        return [f"does not compile: {rec.get('error', '?')[:300]}"]
    problems = []
    if rec["shared"] > limit:
        problems.append(f"needs {rec['shared']} bytes of shared memory, over the {limit} of sm_{rec['arch']}")
    if rec["narrow_products"]:
        problems.append("32-bit address products of runtime sizes: " + "; ".join(rec["narrow_products"][:3]))
    if rec["float_scalars"]:
        problems.append("float scalar arguments (fp32 when compiled): " + ", ".join(rec["float_scalars"]))
    if rec["target"] == "unexpected":
        problems.append("the PTX is not for the requested architecture")
    return problems


def _work(args):
    family, index, full, arch = args
    return compile_one(configs(family, full)[index], arch)


def run(families, full: bool, arch: int, jobs: int, timeout: float | None = None) -> list[dict]:
    """Compile every configuration of `families`; one record per kernel, in order."""
    tasks = [(fam, i, full, arch) for fam in families for i in range(len(configs(fam, full)))]
    if jobs <= 1:
        return [_work(t) for t in tasks]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_work, t) for t in tasks]
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for (fam, i, _, _), fut in zip(tasks, futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                rec = fut.result(timeout=left)
            except concurrent.futures.TimeoutError:
                rec = {"kernel": f"{fam}[{i}]", "label": "", "ok": False, "error": "time limit"}
            rec["family"] = fam
            out.append(rec)
        return out


def summary_lines(records: list[dict], limit: int) -> list[str]:
    lines = [f"{'kernel':<28} {'shared':>8} {'regs':>5} {'stack':>6} {'spill':>6} {'wgmma':>5} {'s':>5}  configuration"]
    for r in records:
        if not r.get("ok"):
            lines.append(f"{r['kernel']:<28} {'FAILED':>8}  {r.get('label', '')}: {r.get('error', '')[:160]}")
            continue
        spill = "-" if r["spill_stores"] is None else str(r["spill_stores"])
        regs = "-" if r["registers"] is None else str(r["registers"])
        stack = "-" if r["stack"] is None else str(r["stack"])
        mark = " OVER" if r["shared"] > limit else ""
        lines.append(f"{r['kernel']:<28} {r['shared']:>8} {regs:>5} {stack:>6} {spill:>6} {str(r['wgmma']):>5} "
                     f"{r['seconds']:>5}  {r['label']}{mark}")
    return lines


def self_test() -> int:
    """Compile a row gather with 32-bit and with 64-bit row offsets and a kernel with a float
    argument: the checks must report the first and the third, not the second."""
    import triton
    import triton.language as tl

    from ._triton_support import AotConfig

    @triton.jit
    def narrow_rows(X, Y, stride, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + rows, tl.load(X + rows * stride))

    @triton.jit
    def wide_rows(X, Y, stride, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + rows, tl.load(X + rows * stride))

    @triton.jit
    def float_arg(X, Y, scale, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i) * scale)

    sig = {"X": "*fp64", "Y": "*fp64", "stride": "i32"}
    narrow = compile_one(AotConfig(narrow_rows, sig, {"BLOCK": 64}, 4, 1, ("X", "Y")), 90)
    wide = compile_one(AotConfig(wide_rows, sig, {"BLOCK": 64}, 4, 1, ("X", "Y")), 90)
    floats = compile_one(AotConfig(float_arg, {"X": "*fp64", "Y": "*fp64", "scale": "fp32"}, {"BLOCK": 64}, 4, 1), 90)
    ok = (narrow.get("ok") and narrow["narrow_products"] and wide.get("ok") and not wide["narrow_products"]
          and floats.get("ok") and floats["float_scalars"] and not wide["float_scalars"])
    print("narrow:", narrow.get("narrow_products"), narrow.get("error", ""))
    print("wide:", wide.get("narrow_products"), wide.get("error", ""))
    print("float:", floats.get("float_scalars"), floats.get("error", ""))
    print("self-test passed" if ok else "self-test FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("structloss_fast._aot: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m structloss_fast._aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", action="append", choices=TRITON_FAMILIES)
    p.add_argument("--full", action="store_true", help="every supported loss of each entry (default: the heaviest)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole compile")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--self-test", action="store_true", help="check that the checks can fail, and exit")
    args = p.parse_args(argv)
    if args.self_test:
        return self_test()
    families = args.family or list(TRITON_FAMILIES)
    limit = SHARED_LIMITS.get(args.arch, SHARED_LIMITS[90])
    t0 = time.perf_counter()
    records = run(families, args.full, args.arch, args.jobs, args.timeout)
    bad = [(r, why) for r in records for why in check(r, limit)]
    for line in summary_lines(records, limit):
        print(line)
    print(f"{len(records)} kernels compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s "
          f"(shared memory limit {limit} bytes); {len(bad)} problems")
    for r, why in bad:
        print(f"PROBLEM {r.get('family', '')} {r['kernel']} [{r.get('label', '')}]: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "shared_limit": limit, "records": records}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

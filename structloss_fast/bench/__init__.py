"""Benchmark suite: cases x providers x sizes, timed and memory-measured side by side.

A family registers its cases in structloss_fast/bench/<family>.py with `@register`. Each
provider is a setup function `setup(size: dict, device: torch.device) -> run` that builds the
inputs and returns a zero-argument callable doing one measured step (e.g. forward+backward).
Every (case, provider, size) is measured in a fresh subprocess (structloss_fast.bench.worker)
so that its peak memory is its own: peak RSS above the RSS after the inputs were built on
CPU, torch.cuda.max_memory_allocated above the inputs on GPU.

`python -m structloss_fast bench` runs the suite (see runner.py); bench/test_bench_*.py run
the same providers under pytest-benchmark.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

Setup = Callable[[dict, "object"], Callable[[], object]]

# Families whose cases are part of the suite, in the order they are run.
FAMILIES = ("pairwise", "softmax", "jem", "taskmet", "seal", "imitation", "adversarial")


@dataclasses.dataclass
class Case:
    family: str
    name: str
    description: str
    providers: dict[str, Setup]
    sizes: list[dict]                    # default run (the whole suite fits in about 3 minutes on 2 cores)
    full_sizes: list[dict] = dataclasses.field(default_factory=list)  # --full: the issues' targets
    ours: tuple[str, ...] = ("structloss_fast",)
    # Providers shown for reference but not counted as peers (e.g. a GEMM floor).
    reference_points: tuple[str, ...] = ()
    # (provider, size, device) -> reason to skip, or None.
    skip: Optional[Callable[[str, dict, str], Optional[str]]] = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    mode: str = "forward+backward"

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"

    def skip_reason(self, provider: str, size: dict, device: str) -> Optional[str]:
        return self.skip(provider, size, device) if self.skip else None


_REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.key in _REGISTRY:
        raise ValueError(f"benchmark case {case.key} registered twice")
    _REGISTRY[case.key] = case
    return case


def load_cases(families=FAMILIES) -> dict[str, Case]:
    for fam in families:
        importlib.import_module(f"structloss_fast.bench.{fam}")
    return {k: c for k, c in _REGISTRY.items() if c.family in families}


def get_case(key: str) -> Case:
    family = key.split("/", 1)[0]
    load_cases((family,))
    return _REGISTRY[key]


def size_label(size: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in size.items())


def fwd_bwd_provider(make_inputs, loss_fn):
    """A provider's setup: (x, y) = make_inputs(size, device) with x requiring grad, and one run =
    loss_fn(x, y).backward() (x.grad cleared between runs)."""
    def setup(size, device):
        x, y = make_inputs(size, device)

        def run():
            loss = loss_fn(x, y)
            loss.backward()
            x.grad = None

        return run

    return setup

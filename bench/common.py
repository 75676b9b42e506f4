"""pytest-benchmark parametrization over the suite's cases (structloss_fast/bench/<family>.py)."""
import pytest
import torch

from structloss_fast.bench import load_cases, size_label


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def parametrize_family(family: str):
    cases = [c for c in load_cases((family,)).values() if device() in c.devices]
    params = [
        pytest.param(case, provider, size, id=f"{case.name}-{provider}-{size_label(size)}")
        for case in cases for size in case.sizes for provider in case.providers
    ]
    return pytest.mark.parametrize("case,provider,size", params)


def run_benchmark(benchmark, case, provider, size):
    reason = case.skip_reason(provider, size, device())
    if reason:
        pytest.skip(reason)
    try:
        run = case.providers[provider](size, torch.device(device()))
    except ImportError as exc:  # a peer that is not installed
        pytest.skip(str(exc))
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)

    def step():
        run()
        sync()

    benchmark.pedantic(step, warmup_rounds=1, rounds=3, iterations=1)

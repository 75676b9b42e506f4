"""The benchmark suite under pytest-benchmark: `pytest bench/ --benchmark-only [-k pairwise]`.
Cases, providers and sizes are structloss_fast/bench/<family>.py's (`python -m structloss_fast
bench` runs the same, with memory)."""
from structloss_fast.bench import pytest_parametrize, pytest_run


@pytest_parametrize()
def test_bench(benchmark, case, provider, size):
    pytest_run(benchmark, case, provider, size)

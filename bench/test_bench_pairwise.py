from common import parametrize_family, run_benchmark


@parametrize_family("pairwise")
def test_pairwise(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

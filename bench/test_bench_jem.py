from common import parametrize_family, run_benchmark


@parametrize_family("jem")
def test_jem(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

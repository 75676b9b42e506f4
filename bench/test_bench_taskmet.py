from common import parametrize_family, run_benchmark


@parametrize_family("taskmet")
def test_taskmet(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

from common import parametrize_family, run_benchmark


@parametrize_family("imitation")
def test_imitation(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

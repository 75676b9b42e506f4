from common import parametrize_family, run_benchmark


@parametrize_family("seal")
def test_seal(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

from common import parametrize_family, run_benchmark


@parametrize_family("softmax")
def test_softmax(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

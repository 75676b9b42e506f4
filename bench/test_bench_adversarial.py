from common import parametrize_family, run_benchmark


@parametrize_family("adversarial")
def test_adversarial(benchmark, case, provider, size):
    run_benchmark(benchmark, case, provider, size)

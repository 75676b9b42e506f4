"""The digits example (examples/softmax_digits_el.py) in a short configuration."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

PATH = pathlib.Path(__file__).resolve().parents[2] / "examples" / "softmax_digits_el.py"


def test_digits_example_runs_and_el_keeps_the_target_gradient(capsys):
    spec = importlib.util.spec_from_file_location("softmax_digits_el", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--epochs", "3", "--every", "1"])
    out = capsys.readouterr().out
    assert "EL LE=0.75 acc" in out and "final:" in out
    assert set(results) == {"CE", "EL LE=1", "EL LE=0.75", "EL LE=0.5"}
    for name, hist in results.items():
        assert len(hist) == 3
        assert hist[-1][1] > 0.8, f"{name} did not learn: {hist}"
    # Epoch 1 starts from the same network: EL's per-example target gradient is exactly 1 below
    # LE (rho = 1), above CE's 1 - p; it stays above CE's afterwards.
    assert abs(results["EL LE=1"][0][2] - 1.0) < 1e-3
    for e in range(3):
        assert results["EL LE=1"][e][2] > results["CE"][e][2]

"""The digits example (examples/pairwise_digits.py) in a short configuration: every mined, reduced,
memory and unlabeled training loop of it runs and learns."""
import importlib.util
import math
import pathlib

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

PATH = pathlib.Path(__file__).resolve().parents[2] / "examples" / "pairwise_digits.py"
MINED = ["circle + MS miner", "multi-sim + MS miner", "triplet + semihard miner", "triplet + easy/semihard",
         "contrastive + pair margin", "circle + threshold + memory", "contrastive (cosine) + reg",
         "ntxent, two views (no labels)"]


def test_digits_example_mined_training_learns():
    spec = importlib.util.spec_from_file_location("pairwise_digits", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--epochs", "4", "--only", *MINED])
    assert set(MINED) <= set(results)
    for name in MINED:
        assert math.isfinite(results[name]) and results[name] > 0.85, f"{name}: Recall@1 {results[name]}"
    labelled = [results[name] for name in MINED if "no labels" not in name]
    assert max(labelled) > results["untrained network"], "no mined loss improved on the untrained network"

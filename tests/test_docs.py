"""The python blocks of the README and of docs/*.md run as written."""
from __future__ import annotations

import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _blocks():
    for path in DOCS:
        for k, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
            yield pytest.param(path, block, id=f"{path.relative_to(ROOT)}#{k}")


@pytest.mark.parametrize("path,block", list(_blocks()))
def test_python_block_runs(path, block, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. the documented imitation networks merge without a bridge
        exec(compile(block, str(path), "exec"), {"__name__": "docs_example"})
    for name in re.findall(r"[\"']([\w./-]+\.png)[\"']", block):  # the plots a block says it writes
        assert (tmp_path / name).exists(), f"{path.name}: {name} was not written"

"""The facts the families share are written once: the enums of csrc/common/ids.h equal
structloss_fast/_ids.py's, every family has the same layout and its Triton kernels import no op
glue, and nothing points outside the repository."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

import structloss_fast as slf
from structloss_fast import _ids, _registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS_H = ROOT / "csrc" / "common" / "ids.h"


def _snake(camel: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", camel).upper()


def _cxx_enums() -> dict[str, dict[str, int]]:
    text = IDS_H.read_text()
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*\w+\s*\{(.*?)\};", text, flags=re.S):
        body = re.sub(r"//[^\n]*", "", body)
        enums[name] = {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}
    return enums


def test_every_header_enum_is_mirrored():
    assert set(_cxx_enums()) == set(_ids.CXX_ENUMS), "an enum of ids.h is missing from _ids.CXX_ENUMS or vice versa"


@pytest.mark.parametrize("cxx_name", sorted(_ids.CXX_ENUMS))
def test_python_enum_equals_header(cxx_name):
    py_enum, prefix = _ids.CXX_ENUMS[cxx_name]
    cxx = _cxx_enums()[cxx_name]
    counts = {k: v for k, v in cxx.items() if k.startswith("kNum")}
    values = {k: v for k, v in cxx.items() if not k.startswith("kNum")}
    assert len(counts) == 1, f"{cxx_name} must end with one kNum... count"
    assert list(counts.values())[0] == len(values) == len(py_enum)
    expected = {}
    for k, v in values.items():
        assert k.startswith("k" + prefix), f"{k} lacks the prefix k{prefix}"
        expected[_snake(k[1 + len(prefix):])] = v
    assert {m.name: int(m) for m in py_enum} == expected


def test_pair_loss_facts_equal_header():
    text = IDS_H.read_text()
    rows = re.findall(r"case\s+(k\w+):\s*return\s*\{(\d+),\s*(\d+),\s*(true|false),\s*(true|false)\};", text)
    cxx = {_snake(k[1:]): (int(t), int(p), g == "true", r == "true") for k, t, p, g, r in rows}
    py = {loss.name: tuple(info) for loss, info in _ids.PAIR_LOSS_INFO.items()}
    assert cxx == py


def _families():
    return list(slf.FAMILIES)


# Families without compiled ops of their own: the adversarial losses are the model's own passes
# around pgd_attack (measured: 85-91% of a training step; nothing to fuse).
WITHOUT_OPS = {"adversarial"}


@pytest.mark.parametrize("family", _families())
def test_family_layout(family):
    pkg = ROOT / "structloss_fast" / family
    assert (pkg / "__init__.py").exists() and (pkg / "reference.py").exists()
    assert (ROOT / "tests" / family).is_dir(), f"tests/{family}/"
    assert (ROOT / "docs" / f"{family}.md").exists() and (ROOT / "docs" / "spec" / f"{family}.md").exists()
    assert (ROOT / "structloss_fast" / "bench" / f"{family}.py").exists()
    has_ops = any(spec.family == family for spec in _registry.ops().values())
    assert has_ops == (pkg / "_ops.py").exists(), "a family's ops are declared in its _ops.py"
    assert has_ops or family in WITHOUT_OPS, "the family's ops declare their backends"
    assert set(getattr(slf, family).__all__) <= set(slf.__all__), "the family's public names are re-exported"


@pytest.mark.parametrize("path", sorted((ROOT / "structloss_fast").glob("*/_triton.py")), ids=lambda p: p.parent.name)
def test_triton_modules_import_no_op_glue(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
            assert not any(n.endswith("_ops") or n == "_oplib" for n in names), f"{path.name} imports op glue: {names}"


def test_no_pointer_outside_the_repository():
    patterns = re.compile(r"\.\./shared|shared/spec|the issue|issues' target|target sizes of the issues")
    files = [p for ext in ("py", "md", "h", "cpp", "cu", "sh", "txt") for p in ROOT.rglob(f"*.{ext}")
             if not any(part.startswith(".") or part in ("build", "results") for part in p.relative_to(ROOT).parts)]
    offenders = [str(p.relative_to(ROOT)) for p in files if p != pathlib.Path(__file__) and patterns.search(p.read_text())]
    assert not offenders, f"pointers outside the repository in {offenders}"

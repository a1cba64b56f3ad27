"""Every Python block of the README runs as written.

The blocks run in order, in one namespace (a later block may use what an
earlier one made), in a temporary directory (blocks write model files). A
block that imports an optional peer (torch, keras, onnx, dask) is skipped
when that peer is missing (the README's later blocks do not use its names),
and the test then reports a skip naming it. The README defines every name
its blocks use: there is no fixture to keep in step with it.
"""
import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
PEERS = ("torch", "keras", "onnx", "onnxruntime", "dask", "distributed", "sklearn",
         "safetensors")


def python_blocks():
    """(line number, source) of each ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def missing_peers(source):
    imported = re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", source, flags=re.M)
    return sorted({name for name in imported
                   if name in PEERS and importlib.util.find_spec(name) is None})


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    skipped = []
    for line, source in python_blocks():
        missing = missing_peers(source)
        if missing:
            skipped.append(f"the block at line {line} needs {', '.join(missing)}")
            continue
        try:
            exec(compile(source, f"README.md, block at line {line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the README block at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if skipped:
        pytest.skip("; ".join(skipped))

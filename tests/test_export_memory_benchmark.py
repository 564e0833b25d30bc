"""``benchmarks/export_memory.py`` runs every export and load it promises on a tiny model (its figures are not
tested). A file of its own: pytest-xdist hands out whole files, and the benchmark tests are the longest."""

from __future__ import annotations

import json

from test_benchmarks import run


def test_export_memory_benchmark_exports_and_loads_each_way(tmp_path):
    """Six runs (export from both checkpoint forms, load the result; chunked and whole), the same weights each time."""
    stdout = run("export_memory.py", "--preset", "tiny", "--json", "e.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [(r["action"], r["source"], r["mode"]) for r in rows] == [
        ("export", "one.ckpt", "chunked"), ("export", "one.ckpt", "whole"),
        ("export", "sharded.ckpt", "chunked"), ("export", "sharded.ckpt", "whole"),
        ("load", "out-one-chunked", "chunked"), ("load", "out-one-chunked", "whole"),
    ]  # fmt: skip
    weights = rows[0]["parameters"] * 2  # bfloat16; the tied LM head stored once
    assert all(r["bytes"] == weights for r in rows if r["action"] == "load")
    exported = {r["bytes"] for r in rows if r["action"] == "export"}  # model.safetensors: the weights and a header
    assert len(exported) == 1 and 0 < exported.pop() - weights < 1 << 16
    assert all(r["seconds"] > 0 for r in rows) and "wrote e.json" in stdout

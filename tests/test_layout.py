"""The layout rules of the redesign: short functions, and one place that resolves decoder specs."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fastdec"
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "function_lengths.py"


def _lengths():
    spec = importlib.util.spec_from_file_location("function_lengths", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.function_lengths


def test_no_function_is_over_80_lines():
    over = [(n, where) for n, where in _lengths()(SRC) if n > 80]
    assert not over, over


def test_the_length_script_sees_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 90)
    assert _lengths()(tmp_path)[0][0] == 91


def test_only_resolve_decides_between_presets_files_and_hub_ids():
    """The preset registry is consulted for membership (``name in PRESETS`` / ``in list_decoders()``) only
    in models/ (which owns it) and resolve.py: no command decides preset-vs-file on its own."""
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("models/") or rel in ("resolve.py", "latent_spaces.py"):  # latent_spaces: space presets
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                text = ast.unparse(node.comparators[-1])
                if "PRESETS" in text or "list_decoders(" in text or "PRETRAINED" in text:
                    offenders.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders

"""List functions longer than a bound (default 80 lines) in a source tree: the short-functions rule.

Data tables (module-level dict/list literals) are not functions and are not counted. Exit status 1 when any
function is over the bound, so CI or a test can use it: ``python benchmarks/function_lengths.py src/fastdec``.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, "path:line name") for every function and method under ``root``, longest first."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                rows.append((node.end_lineno - start + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", nargs="?", default="src/fastdec", type=Path)
    parser.add_argument("--max-lines", type=int, default=80)
    parser.add_argument("--top", type=int, default=10, help="also list the N longest functions")
    args = parser.parse_args(argv)
    rows = function_lengths(args.root)
    over = [r for r in rows if r[0] > args.max_lines]
    for lines, where in rows[: args.top]:
        print(f"{lines:5d}  {where}")
    print(f"{len(rows)} functions, {len(over)} over {args.max_lines} lines")
    for lines, where in over:
        print(f"OVER {lines:5d}  {where}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())

"""The longest functions and methods in `src/` and `serving/`; prints ONE JSON line last.

    python benchmarks/longest_functions.py [-n 10] [--max 60] [PATH ...]

Length is the number of source lines from the `def` line to the function's last line (decorators not
counted; docstrings, comments and nested functions are). Each function is listed as `path:line name lines`.

With `--max L`, a function longer than L lines needs a one-line reason, written as a `# long: <why>` comment
at the end of its `def` line or on the line just above it (above its decorators, if any); the script lists
the ones without it and exits 1. The JSON line: {"top": [...], "max": L, "over_limit": [...], "excused": [...]}.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("src", "serving")
# `# long: the reason` (the reason must not be empty).
REASON = re.compile(r"#\s*long:\s*(\S.*)$")


@dataclass(frozen=True)
class Function:
    path: str
    line: int
    name: str
    lines: int
    reason: str | None


def reason_for(node: ast.FunctionDef | ast.AsyncFunctionDef, source_lines: list[str]) -> str | None:
    """The `# long:` reason on the def line or on the line above the def (or its decorators), if any."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    for lineno in (node.lineno, first - 1):
        if 1 <= lineno <= len(source_lines) and (match := REASON.search(source_lines[lineno - 1])):
            return match.group(1).strip()
    return None


def functions_in(path: Path, rel: str) -> list[Function]:
    """Every function and method in one file, nested ones included, named `Class.method` / `outer.inner`."""
    source = path.read_text(encoding="utf-8")
    source_lines = source.splitlines()
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                found.append(Function(rel, child.lineno, name, length, reason_for(child, source_lines)))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename=str(path)), "")
    return found


def collect(roots: list[Path]) -> list[Function]:
    """All functions under `roots`, longest first (ties by path and line, so the order is stable)."""
    found: list[Function] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            rel = (
                path.resolve().relative_to(ROOT).as_posix()
                if path.resolve().is_relative_to(ROOT)
                else str(path)
            )
            found.extend(functions_in(path, rel))
    return sorted(found, key=lambda f: (-f.lines, f.path, f.line))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders (default: src serving)")
    parser.add_argument("-n", "--top", type=int, default=10, help="how many to list (default 10)")
    parser.add_argument(
        "--max", type=int, default=None, help="fail on functions longer than this without a reason"
    )
    args = parser.parse_args(argv)

    roots = args.paths or [ROOT / p for p in DEFAULT_PATHS]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    functions = collect(roots)
    top = functions[: args.top]
    for f in top:
        print(f"{f.path}:{f.line} {f.name} {f.lines}")

    over = [f for f in functions if args.max is not None and f.lines > args.max]
    unexcused = [f for f in over if f.reason is None]
    if unexcused:
        print(f"\n{len(unexcused)} function(s) over {args.max} lines without a `# long: <why>` comment:")
        for f in unexcused:
            print(f"{f.path}:{f.line} {f.name} {f.lines}")
        print("Split them, or add `# long: <one-line reason>` on the def line or the line above it.")
    record = {
        "top": [{k: v for k, v in asdict(f).items() if k != "reason"} for f in top],
        "max": args.max,
        "over_limit": [{k: v for k, v in asdict(f).items() if k != "reason"} for f in unexcused],
        "excused": [asdict(f) for f in over if f.reason is not None],
    }
    print(json.dumps(record))
    return 1 if unexcused else 0


if __name__ == "__main__":
    sys.exit(main())

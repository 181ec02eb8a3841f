"""The layering holds (docs/architecture.md): import-linter's contracts, no import cycles, and stage deps.

grimp (which import-linter brings) reads every import statement in `src/intentops`, imports inside
functions included, so these tests see what the code imports, not what a reviewer remembers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "intentops"
PACKAGE_DIR = ROOT / "src" / PACKAGE
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
STAGE_CMD = re.compile(rf"python\s+-m\s+({PACKAGE}\.stages\.\w+)")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """The import graph of the installed package (no on-disk cache: it is quick and leaves no files)."""
    return grimp.build_graph(PACKAGE, cache_dir=None)


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    """The stages of dvc.yaml, by name."""
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> str:
    """`intentops.a.b` -> `src/intentops/a/b.py` (or `.../b/__init__.py`), relative to the project root."""
    base = ROOT / "src" / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return path.relative_to(ROOT).as_posix()


def stage_module(name: str, stage: dict) -> str:
    """The module a stage's `cmd` runs (`python -m intentops.stages.<name>`)."""
    match = STAGE_CMD.search(stage["cmd"])
    assert match, f"dvc.yaml stage {name!r}: cmd {stage['cmd']!r} does not run `python -m intentops.stages.*`"
    return match.group(1)


def imported_files(graph: grimp.ImportGraph, module: str) -> set[str]:
    """The project files a module runs: itself and every project module it imports, directly or not.

    A parent package's `__init__` also runs on import, but nothing happens at import time (STYLE 12) and a
    stage that uses a name from the package imports the package itself, which grimp records.
    """
    return {module_file(m) for m in {module} | graph.find_upstream_modules(module)}


def source_deps(stage: dict) -> list[str]:
    """The stage's deps inside the package (files or folders), without a trailing slash."""
    return [d.rstrip("/") for d in stage.get("deps", []) if d.rstrip("/").startswith(f"src/{PACKAGE}")]


def covers(dep: str, path: str) -> bool:
    """A dep covers a file when it is that file or a folder above it."""
    return path == dep or path.startswith(f"{dep}/")


def test_stage_deps_cover_the_modules_the_stage_imports(graph, stages):
    problems = []
    for name, stage in stages.items():
        deps = source_deps(stage)
        missing = sorted(
            f for f in imported_files(graph, stage_module(name, stage)) if not any(covers(d, f) for d in deps)
        )
        if missing:
            problems.append(f"stage {name!r} imports code its deps do not list: {', '.join(missing)}")
    if problems:
        pytest.fail(
            "\n".join(problems) + "\nAdd them to the stage's deps in dvc.yaml (a package folder such as "
            "src/intentops/inference covers every file in it), so that `dvc repro` reruns the stage when they change."
        )


def test_stage_deps_list_only_code_the_stage_imports(graph, stages):
    """No stale source deps. Code loaded by name at run time (a torch bundle's pickled featurizer, the net's
    `_target_`) is invisible to grimp: stages that load torch bundles list src/intentops/models as a folder."""
    problems = []
    for name, stage in stages.items():
        files = imported_files(graph, stage_module(name, stage))
        for dep in source_deps(stage):
            if dep in (f"src/{PACKAGE}", "src"):
                problems.append(
                    f"stage {name!r}: {dep} would rerun the stage on any change; list what it imports"
                )
            elif not (ROOT / dep).exists():
                problems.append(f"stage {name!r}: {dep} does not exist (moved?)")
            elif not any(covers(dep, f) for f in files):
                problems.append(f"stage {name!r}: {dep} is listed but the stage imports nothing in it")
    if problems:
        pytest.fail(
            "\n".join(problems) + "\nFix the stage's deps in dvc.yaml: stale deps rerun stages for nothing."
        )


def test_import_linter_contracts_hold():
    """`lint-imports` (as `make lint` runs it) keeps every contract in pyproject.toml's [tool.importlinter]."""
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} not found: install the dev extra (`make venv`)"
    # COLUMNS: rich wraps the report at 80 columns when not on a terminal.
    env = {**os.environ, "COLUMNS": "160"}
    cmd = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"lint-imports found broken contracts:\n{run.stdout}\n{run.stderr}")


def test_no_import_cycles_between_modules(graph):
    """No module reaches itself through its imports.

    import-linter's acyclic_siblings contract finds cycles between siblings (and packages of siblings),
    but not between a package's `__init__` and a module inside it, which fail at import just the same.
    """
    cycles = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycle = (importer, *back)
                # One entry per cycle, whichever module it was found from.
                start = cycle.index(min(cycle[:-1]))
                cycles.add(" -> ".join((*cycle[start:-1], *cycle[:start], cycle[start])))
    if cycles:
        pytest.fail(
            "import cycles (move the shared code down a layer, docs/architecture.md):\n"
            + "\n".join(sorted(cycles))
        )


def test_no_function_over_60_lines_without_a_reason():
    """Short functions: benchmarks/longest_functions.py --max 60 lists any longer one without `# long: <why>`."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "longest_functions.py"), "--max", "60"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

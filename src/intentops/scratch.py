"""A scratch DVC project: a git + DVC repo in a temp folder that runs this project's real pipeline.

The loop demo, the benchmarks and the integration tests all make one here, so the main workspace's data,
models and reports are never touched. Stages run `python -m intentops.stages.<name>` from the installed
package; the copied `src/` is there because `dvc.yaml` lists its files as dependencies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from intentops.config import load_params, repo_root, write_params
from intentops.errors import UserError

# The pipeline's code and config; its inputs (paths.external_dir, paths.feedback_labels with its DVC pointer and
# .gitignore) are added from params.
CODE_ITEMS = ("conf", "src", "dvc.yaml", "serving", ".gitignore", ".dvcignore")
GIT = ["git", "-c", "user.name=intentops-scratch", "-c", "user.email=scratch@localhost"]
PLOT_TEMPLATES = ".dvc/plots"  # where DVC looks for the templates that dvc.yaml's `plots:` name


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ with this interpreter's bin dir (dvc, intentops, ray) first on PATH, updated with `extra`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def create_project(
    dest: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Create a git + DVC repo at `dest` holding this project's pipeline, or refresh the one already there.

    A new project gets everything committed (`dvc exp run` needs a commit). An existing one (a benchmark's
    kept work dir) gets fresh code and config and recomposed params; its data, outputs and cache stay.
    The reviewed labels are copied from `root`'s workspace (restored from their pointer when missing there,
    e.g. a fresh clone) and `dvc add`-ed, so the project's pointer and cache hold them as in production.

    Args:
        dest: the project folder; created when missing.
        overrides: Hydra overrides composed over conf/ into dest/params.yaml.
        root: the project whose pipeline is copied (default: the one around the working directory).
        cache_dir: a DVC cache to use instead of dest/.dvc/cache, e.g. one shared by several projects.
        env: the environment git and dvc run with (default: `tool_env()`).
    """
    dest, root = Path(dest).resolve(), Path(root or repo_root()).resolve()
    env = dict(env or tool_env())
    fresh = not (dest / ".dvc").is_dir()
    copy_items(root, dest, CODE_ITEMS)
    paths = load_params(write_project_params(dest, overrides)).paths
    labels = Path(paths.feedback_labels)
    copy_items(root, dest, (paths.external_dir, labels, f"{labels}.dvc", labels.parent / ".gitignore"))
    if fresh:
        _run(["git", "init", "-q"], dest, env)
        _run(["dvc", "init", "-q"], dest, env)
        shutil.copy2(root / ".dvc" / "config", dest / ".dvc" / "config")
    # dvc.yaml's custom plot templates; after `dvc init`, which refuses a folder that already has a .dvc/.
    copy_items(root, dest, (PLOT_TEMPLATES,))
    if cache_dir is not None:
        _run(["dvc", "cache", "dir", "--local", str(Path(cache_dir).resolve())], dest, env)
    add_labels(dest, labels, env)
    if fresh:
        _run([*GIT, "add", "-A"], dest, env)
        _run([*GIT, "commit", "-qm", "scratch project"], dest, env)
    return dest


def add_labels(dest: Path, labels: Path, env: Mapping[str, str]) -> None:
    """Restore a labels file the source workspace lacked (header-only or the error saying what to do), then
    `dvc add` it: the project's pointer names what was copied, and its cache holds it. The restore runs as
    the CLI: scratch sits below intentops.feedback in the layers."""
    if not (dest / labels).is_file():
        _run(["intentops", "labels", "restore"], dest, env)
    _run(["dvc", "add", "-q", str(labels)], dest, env)


def copy_items(root: Path, dest: Path, items: Sequence[str]) -> None:
    """Copy files and folders (relative paths) from `root` to `dest`, replacing what is there; missing ones are skipped."""
    for item in items:
        src, dst = root / item, dest / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dst)


def write_project_params(
    project: str | os.PathLike, overrides: Sequence[str] = (), out: str = "params.yaml"
) -> Path:
    """Compose the project's conf/ with `overrides` into project/`out` (as `dvc exp run -S` does); returns its path."""
    project = Path(project)
    with contextlib.chdir(project):  # write_params composes the conf/ of the working directory's project
        return write_params(project / out, list(overrides))


def _run(cmd: list[str], cwd: Path, env: Mapping[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"`{' '.join(cmd)}` exited {proc.returncode} while creating a scratch project:\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}",
            where=str(cwd),
            fix="check that git and dvc run in this environment (`make venv`) and that the folder is writable",
        )

"""The lock means the same on every machine: a fresh clone plus the team's remote is a no-op.

Clone A and clone B live in different temp folders, each with the fixture mirror at its own absolute path, and
share a local-directory DVC remote (the team's). A runs the whole pipeline, pushes, and commits what git carries
(dvc.lock and the `cache: false` outputs, `intentops lock adopt`'s list). B is a `git clone` of A: it imports
every module of the package from its own src/ first (bytecode next to the sources, as the tests or any stage
leave it), pulls, and must then find `dvc status` clean and `dvc repro` running no stage. A's outputs hold no
machine path. Then C, a second clone with an empty cache and a third mirror path, reruns the pipeline: its
outputs through `train` must hash as A's (docs/reproducibility.md says what may differ after train, and why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from intentops.data.sources import MIRROR_ENV
from intentops.lockfile import compare, git_outputs
from support import fixture_overrides, make_project, run, write_mirror

# Two short epochs: the test is about what the pipeline writes, not how well the model learns.
TINY = ["model.max_epochs=2", "model.batch_size=32"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
# Each module test reruns the fixture pipeline (about 3 min on 2 cores): CI's slow phase.
pytestmark = pytest.mark.slow
# Pipeline order up to the model: these stages' outputs must not depend on the folder or the run.
THROUGH_TRAIN = ("ingest", "validate", "split", "baseline", "embed", "train")
IMPORT_ALL = (
    "import importlib, pkgutil, intentops\n"
    "assert intentops.__file__.startswith(__import__('os').getcwd()), intentops.__file__\n"
    "for m in pkgutil.walk_packages(intentops.__path__, 'intentops.'):\n"
    "    importlib.import_module(m.name)\n"
)


def env_for(mirror: Path) -> dict[str, str]:
    return {MIRROR_ENV: str(mirror), "WANDB_MODE": "disabled"}


def clone(src: Path, dest: Path, mirror: Path) -> tuple[Path, dict[str, str]]:
    """`git clone` of `src` at `dest`, with its own copy of the fixture mirror at `mirror`."""
    dest.parent.mkdir(parents=True)
    run(["git", "clone", "-q", str(src), str(dest)], dest.parent)
    write_mirror(mirror)
    return dest, env_for(mirror)


def lock_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return [repo / o["path"] for entry in lock.values() for o in entry.get("outs") or []]


def files_under(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Clone A after `dvc repro && dvc push`, with its lock and git-carried outputs committed; the remote."""
    tmp = tmp_path_factory.mktemp("portable")
    mirror = tmp / "a" / "mirrors" / "public"
    shas = write_mirror(mirror)
    repo = make_project(tmp / "a" / "project", fixture_overrides(shas, TINY))
    remote = tmp / "team-remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], repo)
    run(["dvc", "repro"], repo, env_for(mirror))
    run(["dvc", "push"], repo, env_for(mirror))
    carried = git_outputs(repo)
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "pipeline run"], repo)
    return tmp, repo, mirror, carried


def test_outputs_hold_no_machine_paths(team):
    tmp, repo, mirror, _ = team
    machine = [str(tmp), str(repo), str(mirror), sys.prefix, str(Path.home())]
    leaks = {
        str(f.relative_to(repo)): [m for m in machine if m.encode() in f.read_bytes()]
        for f in files_under(lock_outputs(repo))
    }
    assert not {k: v for k, v in leaks.items() if v}, leaks


def test_fresh_clone_plus_remote_is_a_noop(team):
    tmp, repo_a, _, carried = team
    tracked = set(run(["git", "ls-files"], repo_a).stdout.split())
    assert carried and all(any(t == c or t.startswith(c + "/") for t in tracked) for c in carried), carried

    repo, env = clone(repo_a, tmp / "b" / "work" / "clone", tmp / "b" / "data" / "mirror")
    # The test suite's imports first: bytecode lands in src/ (.dvcignore keeps it out of the stages' deps).
    # (PYTHONDONTWRITEBYTECODE may be set where this runs; a developer's shell usually has it unset.)
    run(
        [sys.executable, "-c", IMPORT_ALL],
        repo,
        {"PYTHONPATH": str(repo / "src"), "PYTHONDONTWRITEBYTECODE": ""},
    )
    assert list((repo / "src").rglob("__pycache__/*.pyc")), "the imports wrote no bytecode under src/"
    run(["dvc", "pull"], repo, env)

    status = run(["dvc", "status", "--json"], repo, env).stdout
    assert json.loads(status) == {}, status
    proc = run(["dvc", "repro"], repo, env)
    said = proc.stdout + proc.stderr
    assert "Running stage" not in said, said
    assert run(["git", "status", "--porcelain"], repo).stdout == "", "repro changed tracked files"


def test_empty_cache_rerun_in_another_folder_hashes_the_same_through_train(team):
    tmp, repo_a, _, _ = team
    repo, env = clone(repo_a, tmp / "c" / "somewhere" / "else", tmp / "c" / "mirror")
    # Nothing pulled: the rerun starts from an empty cache and a workspace without outputs; the reviewed labels
    # come back as `make run` brings them (header-only here, as their pointer says).
    run(["intentops", "labels", "restore"], repo, env)
    run(["dvc", "repro", "--force"], repo, env)
    lines, verdict = compare([repo_a, repo])
    print("\n".join(lines))
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    through_train = {o["path"] for s in THROUGH_TRAIN for o in stages[s].get("outs") or []}
    assert through_train and not through_train & set(verdict["different"]), "\n".join(lines)

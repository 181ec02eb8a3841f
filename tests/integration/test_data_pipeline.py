"""The data stages in a real DVC repo in a temp dir: repro, no-op repro, failures that keep the last good
outputs, every bad input the issue lists, and a push/pull round trip to a local remote."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from intentops.config import PARAMS_ENV, load_params
from intentops.data.sources import MIRROR_ENV
from intentops.scratch import write_project_params
from support import (
    fixture_overrides,
    fixture_rows,
    free_port,
    make_project,
    moto_s3,
    run,
    sha256,
    to_csv,
    write_mirror,
)

STAGE = "split"  # the data part of the pipeline; modelling stages have their own tests
SPLITS = ("train", "val", "test")


def digest_tree(root: Path, rel: list[str]) -> dict[str, str]:
    out = {}
    for r in rel:
        p = root / r
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def paths_of(repo: Path):
    """The project's paths (conf/paths, composed into its params.yaml)."""
    return load_params(repo / "params.yaml").paths


def read_splits(repo: Path) -> dict[str, pd.DataFrame]:
    paths = paths_of(repo)
    return {s: pd.read_parquet(repo / paths[s]) for s in SPLITS}


def lock_entries(repo: Path, stages: list[str]) -> dict:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {s: lock[s] for s in stages}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project repo that has run the data stages once on the fixture mirror."""
    tmp = tmp_path_factory.mktemp("proj")
    mirror = tmp / "mirror"
    shas = write_mirror(mirror)
    repo = make_project(tmp / "repo", fixture_overrides(shas))
    env = {MIRROR_ENV: str(mirror)}
    proc = run(["dvc", "repro", STAGE], repo, env)
    return repo, mirror, shas, env, proc


def test_repro_produces_validated_versioned_splits(project):
    repo, _, _, _, proc = project
    assert "validation passed" in proc.stderr + proc.stdout
    frames, paths = read_splits(repo), paths_of(repo)
    train, test = fixture_rows()
    assert len(frames["test"]) == len(test)
    assert len(frames["train"]) + len(frames["val"]) == len(train)
    assert list(frames["train"].columns) == ["text", "label", "origin_split", "source_id"]
    result = json.loads((repo / paths.validation_result).read_text())
    assert result["success"] and result["expectations"] >= 14
    assert (repo / paths.validation_dir / "data_docs/index.html").is_file()
    lock = (repo / "dvc.lock").read_text()
    for stage in ("ingest", "validate", "split"):
        assert f"{stage}:" in lock


def test_second_repro_is_a_noop_and_status_clean(project):
    repo, _, _, env, _ = project
    t0 = time.perf_counter()
    proc = run(["dvc", "repro", STAGE], repo, env)
    elapsed = time.perf_counter() - t0
    assert "didn't change, skipping" in proc.stdout and "Running stage" not in proc.stdout
    assert elapsed <= 5, f"no-op repro took {elapsed:.1f}s"
    status = run(["dvc", "status", STAGE], repo, env)
    assert "up to date" in status.stdout


def test_changed_split_param_reruns_only_split(project, tmp_path):
    repo, _, shas, env, _ = project
    write_project_params(repo, fixture_overrides(shas, ["split.seed=7"]))
    try:
        proc = run(["dvc", "repro", STAGE], repo, env)
        assert "Running stage 'split'" in proc.stdout
        assert "Running stage 'ingest'" not in proc.stdout and "Running stage 'validate'" not in proc.stdout
    finally:
        write_project_params(repo, fixture_overrides(shas))
        run(["dvc", "repro", STAGE], repo, env)


def test_failed_repro_keeps_last_good_outputs_and_lock(project, tmp_path):
    repo, _, _, env, _ = project
    train, test = fixture_rows()
    bad = [
        *train,
        (train[0][0].upper(), "exchange_rate" if train[0][1] != "exchange_rate" else "pin_blocked"),
    ]
    bad_mirror = tmp_path / "bad"
    shas = write_mirror(bad_mirror, train=to_csv(bad))
    write_project_params(repo, fixture_overrides(shas))
    # `ingest` itself succeeds on this data (its lock entry and output may move on); the stage that fails
    # and everything after it must keep the last good outputs and lock entries.
    paths = paths_of(repo)
    watched = [paths.processed_dir, paths.validation_dir]
    before, lock_before = digest_tree(repo, watched), lock_entries(repo, ["validate", "split"])
    try:
        proc = run(["dvc", "repro", STAGE], repo, {MIRROR_ENV: str(bad_mirror)}, check=False)
        assert proc.returncode != 0
        assert "no conflicting labels" in proc.stderr and "train.csv:" in proc.stderr
        assert digest_tree(repo, watched) == before, "a failed repro must not replace the last good outputs"
        assert lock_entries(repo, ["validate", "split"]) == lock_before
        assert (repo / f"{paths.validation_dir}-failed" / "data_docs/index.html").is_file()
    finally:
        write_project_params(repo, fixture_overrides(project[2]))
    run(["dvc", "repro", STAGE], repo, env)
    assert "up to date" in run(["dvc", "status", STAGE], repo, env).stdout


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback, stopped afterwards."""
    with moto_s3() as url:
        yield url


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_push_pull_round_trip(project, tmp_path, request, kind):
    repo, _, _, env, _ = project
    env = dict(env)
    if kind == "local":
        run(["dvc", "remote", "add", "-f", "-d", "rt", str(tmp_path / "remote")], repo)
    else:
        endpoint = request.getfixturevalue("s3_server")
        run(["dvc", "remote", "add", "-f", "-d", "rt", "s3://intentops/dvc"], repo)
        run(["dvc", "remote", "modify", "rt", "endpointurl", endpoint], repo)
        env.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
        )
    try:
        run(["dvc", "push", STAGE, "--with-deps"], repo, env)
        train = repo / paths_of(repo).train
        before = train.read_bytes()
        train.unlink()
        run(
            ["dvc", "cache", "dir", str(tmp_path / "empty-cache")], repo
        )  # nothing local: must come from the remote
        run(["dvc", "pull", STAGE, "--with-deps", "--force"], repo, env)
        assert train.read_bytes() == before
        assert "up to date" in run(["dvc", "status", STAGE], repo, env).stdout
    finally:
        run(["dvc", "cache", "dir", "--unset"], repo, check=False)
        run(["dvc", "remote", "remove", "rt"], repo, check=False)


# ---- bad input: every case gets a non-zero exit and a message naming what, where and what to do ----


def _rows_csv(extra):
    train, _ = fixture_rows()
    return to_csv([*train, *extra])


def _thinned_csv(label: str, keep: int):
    """The fixture's train file with only the first `keep` rows of `label`."""
    train, _ = fixture_rows()
    kept = [r for r in train if r[1] != label] + [r for r in train if r[1] == label][:keep]
    return to_csv(kept)


BAD_INPUTS = {
    # case: (files to write into the mirror, extra overrides, expected stage, substrings of the message)
    "missing file": (
        {"train.csv": None},
        [],
        "ingest",
        ["data file not found", "banking77/train.csv", "fix:"],
    ),
    "sha256 mismatch": (
        {},
        ["data.files.test.sha256=" + "0" * 64],
        "ingest",
        ["sha256 mismatch for 'test'", "fix:"],
    ),
    "empty file": ({"test.csv": b""}, [], "ingest", ["empty (0 bytes)", "test.csv"]),
    "missing column": (
        {"train.csv": b"utterance,category\r\nhi there,card_arrival\r\n"},
        [],
        "ingest",
        ["missing column(s) ['text']", "train.csv:1", "data.text_column"],
    ),
    "invalid utf-8": (
        {"train.csv": b"text,category\r\nmy card\xff\xfe is late,card_arrival\r\n"},
        [],
        "ingest",
        ["not valid UTF-8 at line 2", "train.csv:2", "UTF-8"],
    ),
    "broken quoting": (
        {"train.csv": b'text,category\r\n"my card never came,card_arrival\r\nok,card_arrival\r\n'},
        [],
        "ingest",
        ["broken CSV quoting", "train.csv"],
    ),
    "unreachable url": (
        {},
        ["data.files.train.url=http://127.0.0.1:{port}/train.csv", "ingest.retries=1", "ingest.timeout_s=2"],
        "ingest",
        ["cannot download", "127.0.0.1", MIRROR_ENV],
    ),
    "blank texts": (
        {"train.csv": _rows_csv([("   ", "card_arrival")])},
        [],
        "validate",
        ["text is not blank", "train.csv:"],
    ),
    "unknown label": (
        {"train.csv": _rows_csv([("refund please", "refund_requested")])},
        [],
        "validate",
        ["labels are within the taxonomy", "refund_requested"],
    ),
    "conflicting labels": (
        {"train.csv": _rows_csv([("my pin is blocked", "card_arrival")])},
        [],
        "validate",
        ["no conflicting labels", "train.csv:"],
    ),
    # Warnings by default (tests/integration/test_small_data.py runs them through the pipeline); stops when strict.
    "one-character text, strict": (
        {"train.csv": _rows_csv([(",", "card_arrival")])},
        ["validate.strict=true"],
        "validate",
        [
            "characters long",
            "text=','",
            "train.csv:",
            "-S validate.text_min_chars=1",
            "validate.strict=false",
        ],
    ),
    "small intent, strict": (
        {"train.csv": _thinned_csv("exchange_rate", 2)},
        ["validate.strict=true"],
        "validate",
        [
            "'exchange_rate': 2 training row(s)",
            "-S validate.min_examples_per_class=1",
            "validate.strict=false",
        ],
    ),
    "taxonomy disagrees": (
        {"categories.json": json.dumps(["card_arrival", "exchange_rate"]).encode()},
        [],
        "validate",
        ["labels are within the taxonomy", "lost_or_stolen_card"],
    ),
}


def run_data_stages(repo: Path, tmp_path: Path, overrides: list[str], mirror, labels: str):
    """Run `ingest` then `validate` as dvc.yaml does, in a scratch folder so the module's repo stays intact,
    stopping at the first failure; (their processes, the scratch folder)."""
    params = write_project_params(repo, overrides, out=tmp_path / "params.yaml")  # the project's conf/
    scratch = tmp_path / "work"
    feedback_labels = scratch / paths_of(repo).feedback_labels
    feedback_labels.parent.mkdir(parents=True)
    feedback_labels.write_text(labels)
    env = {PARAMS_ENV: str(params), MIRROR_ENV: str(mirror)}
    procs = []
    for s in ("ingest", "validate"):
        procs.append(run(["python", "-m", f"intentops.stages.{s}"], scratch, env, check=False))
        if procs[-1].returncode != 0:
            break
    return procs, scratch


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_reported_clearly(project, tmp_path, case):
    repo = project[0]
    files, extra, stage, expected = BAD_INPUTS[case]
    mirror = tmp_path / "mirror"
    given = {
        "train": files.get("train.csv"),
        "test": files.get("test.csv"),
        "categories": files.get("categories.json"),
    }
    shas = write_mirror(mirror, **{k: v for k, v in given.items() if v is not None})
    for name in [n for n, content in files.items() if content is None]:
        (mirror / "banking77" / name).unlink()
    port = free_port()  # nothing listens on it
    overrides = fixture_overrides(shas, [e.format(port=port) for e in extra])
    # "unreachable url" runs without a mirror, so the configured URL is used.
    labels = (repo / paths_of(repo).feedback_labels).read_text()
    procs, scratch = run_data_stages(
        repo, tmp_path, overrides, "" if case == "unreachable url" else mirror, labels
    )
    failed = procs[-1]
    assert failed.returncode != 0, f"{case}: expected a failure"
    assert len(procs) == (1 if stage == "ingest" else 2), f"{case} should fail in {stage}"
    message = failed.stderr
    assert "Traceback" not in message, message
    for piece in expected:
        assert piece in message, f"{case}: {piece!r} not in:\n{message}"
    paths = paths_of(repo)
    assert not (scratch / paths.processed_dir).exists()
    if stage == "ingest":
        assert not (scratch / paths.canonical).parent.exists(), (
            "a failed ingest must not half-write its outputs"
        )


def feedback_csv(rows: list[tuple[str, str]]) -> str:
    from intentops.feedback.label import EXPORT_COLUMNS

    header = ",".join(EXPORT_COLUMNS)  # labels.csv's header (a fresh clone has only its pointer, no file)
    return "\n".join([header, *(f'"{t}",{lb}' + "," * (header.count(",") - 1) for t, lb in rows)]) + "\n"


def test_feedback_labels_join_train_only_and_new_intents_extend_the_taxonomy(project):
    repo, _, _, env, _ = project
    paths = paths_of(repo)
    labels = repo / paths.feedback_labels
    original = labels.read_text()
    _, test = fixture_rows()
    new_intent = [(f"I want to upgrade my card to metal number {i}", "new:card_upgrade") for i in range(6)]
    rows = [*new_intent, ("my pin got blocked at the atm", "pin_blocked"), (test[0][0], test[0][1])]
    labels.write_text(feedback_csv(rows))
    try:
        proc = run(["dvc", "repro", STAGE], repo, env)
        assert "Running stage 'ingest'" in proc.stdout  # the labels file is a dependency
        taxonomy = json.loads((repo / paths.taxonomy).read_text())
        assert taxonomy["proposed"] == ["card_upgrade"] and taxonomy["labels"][-1] == "card_upgrade"
        frames = read_splits(repo)
        fb = frames["train"][frames["train"]["origin_split"] == "feedback"]
        assert sorted(fb["text"]) == sorted(t for t, _ in rows[:-1])  # the test text stays in test only
        assert set(fb.loc[fb["text"].str.contains("metal"), "label"]) == {"card_upgrade"}
        assert not (frames["val"]["origin_split"] == "feedback").any()
        assert not (frames["test"]["origin_split"] == "feedback").any() and len(frames["test"]) == len(test)
        stats = json.loads((repo / paths.split_stats).read_text())
        assert stats["feedback"] == {"rows": 8, "in_train": 7, "dropped_as_repeats": 1}
    finally:
        labels.write_text(original)
    run(["dvc", "repro", STAGE], repo, env)


BAD_FEEDBACK = {
    "label outside the taxonomy": (
        [("please refund me now", "refund_requested")],
        ["labels are within the taxonomy", "labels.csv:2"],
    ),
    "duplicate text": (
        [("my pin got blocked at the atm", "pin_blocked")] * 2,
        ["no duplicate texts in the reviewed feedback", "labels.csv:3"],
    ),
    "blank text": ([("   ", "pin_blocked")], ["text is not blank", "labels.csv:2"]),
    "bad proposed name": (
        [("upgrade to metal", "new:Card Upgrade")],
        ["new:<snake_case_name>", "labels.csv:2"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FEEDBACK))
def test_bad_feedback_is_stopped_with_the_row(project, tmp_path, case):
    """Feedback goes through the same Great Expectations suite; a bad row stops the pipeline, naming its line."""
    repo, mirror, shas, _, _ = project
    rows, expected = BAD_FEEDBACK[case]
    procs, _ = run_data_stages(repo, tmp_path, fixture_overrides(shas), mirror, feedback_csv(rows))
    assert procs[-1].returncode != 0 and "Traceback" not in procs[-1].stderr
    for piece in expected:
        assert piece in procs[-1].stderr, f"{case}: {piece!r} not in:\n{procs[-1].stderr}"


def test_dvc_exp_run_composes_conf_with_overrides(project, tmp_path):
    """`dvc exp run -S data=clinc150` recomposes params.yaml from conf/ (Hydra) and reruns the data stages."""
    repo, _, _, _, _ = project
    train, test = fixture_rows()
    full = {
        "train": [list(r) for r in train],
        "val": [list(r) for r in test[:5]],
        "test": [list(r) for r in test[5:]],
        "oos_train": [["what's the weather", "oos"]],
        "oos_val": [["play some jazz", "oos"]],
        "oos_test": [["book a flight to rome", "oos"], ["tell me a joke", "oos"]],
    }
    mirror = tmp_path / "mirror"
    (mirror / "clinc150").mkdir(parents=True)
    data = json.dumps(full).encode()
    (mirror / "clinc150" / "data_full.json").write_bytes(data)
    sets = ["data=clinc150", f"data.files.full.sha256={sha256(data)}", "validate.min_examples_per_class=5"]
    proc = run(
        ["dvc", "exp", "run", STAGE, *[a for s in sets for a in ("-S", s)]], repo, {MIRROR_ENV: str(mirror)}
    )
    assert "Running stage 'ingest'" in proc.stdout and "Ran experiment" in proc.stdout
    paths = paths_of(repo)
    split_stats = json.loads((repo / paths.split_stats).read_text())
    assert split_stats["rows"]["test"] == len(test) - 5 + 2  # official test + oos_test, nothing carved
    assert split_stats["dropped_oos_train"] == 1
    import yaml

    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["name"] == "clinc150"
    # The retrain workflow's summary steps, on this experiment.
    diff = run(["dvc", "metrics", "diff", "--md"], repo)
    assert paths.split_stats in diff.stdout
    run(["dvc", "plots", "diff", "--out", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").is_file()

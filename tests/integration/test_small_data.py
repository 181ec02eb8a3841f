"""A team's own small, messy export through the pipeline with default settings (issue: small real data).

The files are what a support team brings: a train and a test CSV (`data=csv`), one-character messages ("," and
an emoji) in both, an intent with a single training example and one with three, and out-of-scope test rows
under the catch-all label `data.oos_label` names. With nothing relaxed, `dvc repro` must finish; the
warnings name the short rows (file:line and text) and the small intents with their counts; the single-example
intent stays in train; val is small, so `train` cross-fits and `calibrate` picks the threshold on out-of-fold
rows and reports the coverage to expect with its bootstrap interval.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from support import fixture_rows, make_project, run, to_csv

# The whole pipeline on ~300 rows, 20 fold fits included: 50-90 s on 2 cores, so with the slow tests (CI runs
# them); tests/data/test_expectations.py and the bad-input suite check the warnings and errors by default.
pytestmark = pytest.mark.slow

EMOJI = "\U0001f633"
# The only overrides: no W&B, no progress bars (a log, not a terminal). Data settings stay the defaults.
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
CSV = [
    "data=csv",
    "data.label_column=category",
    "data.oos_label=other",
    "data.files.train.path=data/external/train.csv",
    "data.files.test={path: data/external/test.csv}",
]


def messy_files() -> tuple[bytes, bytes]:
    """(train.csv, test.csv): the fixture's six intents plus two small ones, 1-char texts and catch-all rows."""
    train, test = fixture_rows()
    train = [*train, (",", "card_arrival"), ("i want to freeze my card", "freeze_card")]
    train += [
        (t, "close_account") for t in ("close my account", "how do i delete my account", "cancel account")
    ]
    test = [
        *test,
        (",", "exchange_rate"),
        (EMOJI, "top_up_failed"),
        ("please freeze the card", "freeze_card"),
    ]
    test += [(t, "other") for t in ("what's the weather", "tell me a joke", "who won the game", "play music")]
    return to_csv(train), to_csv(test)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("small") / "project", [*QUIET, *CSV])
    external = repo / "data" / "external"
    external.mkdir(parents=True, exist_ok=True)
    train, test = messy_files()
    (external / "train.csv").write_bytes(train)
    (external / "test.csv").write_bytes(test)
    proc = run(["dvc", "repro"], repo, {"WANDB_MODE": "disabled"}, check=False)
    print(
        proc.stdout[-30000:], proc.stderr[-30000:]
    )  # the log a user reads: shown when a test fails, or with -s
    return repo, proc


def test_default_settings_complete_the_pipeline(repro):
    repo, proc = repro
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    test = pd.read_parquet(repo / "data" / "processed" / "test.parquet")
    assert {",", EMOJI} <= set(test["text"]), "one-character test messages are kept"


def test_warnings_name_the_short_rows_and_the_small_intents(repro):
    _, proc = repro
    log = proc.stdout + proc.stderr
    assert "data warning" in log
    assert "train.csv:" in log and "test.csv:" in log and "text=','" in log and f"text={EMOJI!r}" in log
    assert "'freeze_card': 1 training row(s)" in log and "'close_account': 3 training row(s)" in log
    assert "-S validate.min_examples_per_class=1" in log and "-S validate.text_min_chars=1" in log


def test_intents_too_small_to_carve_stay_in_train(repro):
    repo, _ = repro
    stats = json.loads((repo / "reports" / "data" / "split.json").read_text())
    assert stats["kept_whole_in_train"] == {"close_account": 3, "freeze_card": 1}
    train = pd.read_parquet(repo / "data" / "processed" / "train.parquet")
    val = pd.read_parquet(repo / "data" / "processed" / "val.parquet")
    assert (train["label"] == "freeze_card").sum() == 1 and "freeze_card" not in set(val["label"])


def test_small_val_is_cross_fitted_and_the_threshold_reports_its_interval(repro):
    repo, _ = repro
    train = json.loads((repo / "reports" / "train" / "metrics.json").read_text())
    assert train["crossfit"]["used"] and train["crossfit"]["folds"] == 20
    assert train["memory"]["chosen_on"] == "crossfit"
    calibrate = json.loads((repo / "reports" / "calibrate" / "metrics.json").read_text())
    rows = calibrate["calibration_rows"]
    assert rows["source"] == "crossfit" and rows["rows"] == train["crossfit"]["rows"]
    coverage = rows["expected"]["coverage"]
    assert coverage["low"] <= coverage["estimate"] <= coverage["high"] and rows["resamples"] > 900
    assert isinstance(calibrate["warnings"], list)
    assert calibrate["test"]["n_oos"] == 4 and "oos_recall" in calibrate["test"]


def test_the_model_reaches_the_registry(repro):
    """evaluate, export (parity and int8 checks) and promote ran on the same data and settings."""
    repo, _ = repro
    gate = json.loads((repo / "reports" / "promote" / "gate.json").read_text())
    assert gate["promoted"], gate
    export = json.loads((repo / "reports" / "export" / "metrics.json").read_text())
    assert "int8" in export

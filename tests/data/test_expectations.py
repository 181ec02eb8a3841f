"""The Great Expectations suites on fixture data: clean data passes, each defect fails the named expectation."""

from types import SimpleNamespace

import pandas as pd
import pytest

from intentops.stages.validate import (
    build_suites,
    class_counts,
    derive_row_checks,
    failure_message,
    run_validation,
)
from support import INTENT_TEMPLATES, fixture_rows

LABELS = sorted(INTENT_TEMPLATES)
PARAMS = SimpleNamespace(
    text_min_chars=2,
    text_max_chars=200,
    min_examples_per_class=5,
    imbalance_ratio_warn=10.0,
    fail_on_leakage=False,
)


def canonical(mutate=None) -> pd.DataFrame:
    train, test = fixture_rows()
    rows = [(t, lab, "train", f"train.csv:{i + 2}") for i, (t, lab) in enumerate(train)]
    rows += [(t, lab, "test", f"test.csv:{i + 2}") for i, (t, lab) in enumerate(test)]
    df = pd.DataFrame(rows, columns=["text", "label", "origin_split", "source_id"])
    return mutate(df) if mutate else df


def validate(df, tmp_path, labels=LABELS, params=PARAMS):
    frames = {"canonical_rows": derive_row_checks(df), "class_counts": class_counts(df, labels)}
    return run_validation(frames, build_suites(labels, None, params), tmp_path / "docs")


def test_clean_fixture_passes_and_data_docs_list_every_expectation(tmp_path):
    summary = validate(canonical(), tmp_path)
    assert summary["success"], summary["critical_failures"]
    assert summary["expectations"] == len(summary["results"]) >= 14
    html = "".join(p.read_text(errors="ignore") for p in (tmp_path / "docs" / "validations").rglob("*.html"))
    for r in summary["results"]:
        assert (
            r["expectation"].replace("expect_", "") in html.replace(" ", "_").lower()
            or r["description"] in html
        ), r
    assert (tmp_path / "docs" / "index.html").is_file()


def _set(df, i, **cols):
    for k, v in cols.items():
        df.loc[i, k] = v
    return df


@pytest.mark.parametrize(
    "name, mutate, labels, failing",
    [
        ("blank text", lambda d: _set(d, 3, text="   "), LABELS, "text is not blank"),
        (
            "unknown label",
            lambda d: _set(d, 4, label="card_arival"),
            LABELS,
            "labels are within the taxonomy",
        ),
        (
            "conflicting labels",
            lambda d: _set(d, 5, text=d.loc[6, "text"].upper(), label="exchange_rate"),
            LABELS,
            "no conflicting labels",
        ),
        (
            "taxonomy lists a class with no data",
            None,
            [*LABELS, "refund_not_showing_up"],
            "training examples",
        ),
        ("text too long", lambda d: _set(d, 2, text="x" * 500), LABELS, "text length"),
    ],
)
def test_each_defect_fails_its_critical_expectation(tmp_path, name, mutate, labels, failing):
    df = canonical(mutate)
    summary = validate(df, tmp_path, labels=labels)
    assert not summary["success"], name
    descriptions = [f["description"] for f in summary["critical_failures"]]
    assert any(failing in d for d in descriptions), descriptions
    message = failure_message(summary, df)
    assert failing in message and "unexpected row(s)" in message


def test_conflict_report_names_the_rows(tmp_path):
    df = canonical(lambda d: _set(d, 5, text=d.loc[6, "text"], label="exchange_rate"))
    message = failure_message(validate(df, tmp_path), df)
    assert "train.csv:7" in message and "train.csv:8" in message and "exchange_rate" in message


def test_leakage_warns_by_default_and_stops_when_configured(tmp_path):
    leak = lambda d: _set(d, 0, text=d[d.origin_split == "test"].iloc[0]["text"])  # noqa: E731
    summary = validate(canonical(leak), tmp_path / "a")
    assert summary["success"] and any("leakage" in w["description"] for w in summary["warnings"])
    strict = SimpleNamespace(**{**vars(PARAMS), "fail_on_leakage": True})
    summary = validate(canonical(leak), tmp_path / "b", params=strict)
    assert any("leakage" in f["description"] for f in summary["critical_failures"])


def test_imbalance_ratio_is_reported(tmp_path):
    df = canonical()
    summary = validate(df, tmp_path)
    ratio = [r for r in summary["results"] if r.get("column") == "ratio_to_smallest"][0]
    counts = df[df.origin_split == "train"].label.value_counts()
    assert ratio["observed_value"] == pytest.approx(counts.max() / counts.min())

"""The Great Expectations suites on fixture data: clean data passes, each defect fails the named expectation."""

from types import SimpleNamespace

import pandas as pd
import pytest

from intentops.stages.validate import (
    build_suites,
    class_counts,
    derive_row_checks,
    describe,
    failure_fix,
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
    strict=False,
)
STRICT = SimpleNamespace(**{**vars(PARAMS), "strict": True})


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
        ("text too long", lambda d: _set(d, 2, text="x" * 500), LABELS, "characters long"),
    ],
)
def test_each_defect_fails_its_critical_expectation(tmp_path, name, mutate, labels, failing):
    df = canonical(mutate)
    summary = validate(df, tmp_path, labels=labels)
    assert not summary["success"], name
    descriptions = [f["description"] for f in summary["critical_failures"]]
    assert any(failing in d for d in descriptions), descriptions
    message = failure_message(summary, df)
    assert failing in message and "unexpected row(s)" in message and "fix: " in message


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


def _drop_to(df: pd.DataFrame, label: str, keep: int) -> pd.DataFrame:
    """`df` with only the first `keep` training rows of `label`."""
    rows = df.index[(df.origin_split == "train") & (df.label == label)]
    return df.drop(rows[keep:]).reset_index(drop=True)


def test_short_texts_warn_by_default_naming_rows_and_stop_in_strict_mode(tmp_path):
    df = canonical(lambda d: _set(_set(d, 3, text=","), 4, text="\U0001f633"))
    summary = validate(df, tmp_path / "a")
    assert summary["success"], summary["critical_failures"]
    (short,) = [w for w in summary["warnings"] if "characters long" in w["description"]]
    warning = "\n".join(describe(short, df))
    assert "train.csv:5" in warning and "train.csv:6" in warning and "','" in warning
    strict = validate(df, tmp_path / "b", params=STRICT)
    assert not strict["success"]
    message, fix = failure_message(strict, df), failure_fix(strict)
    assert (
        "train.csv:5" in message and "-S validate.text_min_chars=1" in fix and "validate.strict=false" in fix
    )


def test_small_intents_warn_by_default_naming_each_with_its_count(tmp_path):
    small = _drop_to(_drop_to(canonical(), LABELS[0], 1), LABELS[1], 3)
    counts = class_counts(small, [*LABELS, "refund_not_showing_up"])
    frames = {"canonical_rows": derive_row_checks(small), "class_counts": counts}
    suites = build_suites([*LABELS, "refund_not_showing_up"], None, PARAMS)
    summary = run_validation(frames, suites, tmp_path / "a")
    assert summary["success"], summary["critical_failures"]
    lines = "\n".join(line for w in summary["warnings"] for line in describe(w, small, counts))
    assert f"{LABELS[0]!r}: 1 training row(s)" in lines and f"{LABELS[1]!r}: 3 training row(s)" in lines
    assert "'refund_not_showing_up': 0 training row(s)" in lines
    assert "row(s)" in lines and "train.csv:" not in lines  # classes, never row numbers of the count table

    strict = run_validation(
        frames, build_suites([*LABELS, "refund_not_showing_up"], None, STRICT), tmp_path / "b"
    )
    assert not strict["success"]
    message, fix = failure_message(strict, small, counts), failure_fix(strict)
    assert f"{LABELS[0]!r}: 1 training row(s)" in message and "-S validate.min_examples_per_class=1" in fix
    assert "each intent of the taxonomy has training examples" in message


def test_text_too_long_names_its_setting(tmp_path):
    df = canonical(lambda d: _set(d, 2, text="x" * 500))
    summary = validate(df, tmp_path)
    assert "validate.text_max_chars" in failure_fix(summary)

"""model_card.md from the stages' reports (`intentops.inference.model_card`): every section from full reports,
and a sensible line, not a failure, for each report that is missing (no evaluate, no calibrate, no int8)."""

from __future__ import annotations

import copy

import pytest

from intentops.inference.model_card import card_context, params_sha256, render_card

PARAMS = {
    "data": {
        "name": "somedata",
        "licence": "CC BY 9.9",
        "source_url": "https://example.org/d",
        "oos_label": None,
    }
}
CARD = {
    "version": "m-0123456789ab",
    "model": "minilm_head",
    "calibration": {
        "temperature": 1.25,
        "out_of_scope": {"method": "energy", "threshold": -9.5, "target": {"coverage": 0.95}},
        "review": {"min_confidence": 0.5, "min_margin": 0.1},
    },
    "params": PARAMS,
    "git_revision": "abc123+dirty",
}
PER_CLASS = [
    {"intent": f"intent_{i:02d}", "precision": 0.9, "recall": 0.8, "f1": 0.5 + i / 40, "support": 40}
    | {"false_positives": 4 if i == 3 else 1, "false_negatives": 1 if i == 3 else 2}
    for i in range(12)
]
SPLIT = {"n_in_scope": 400, "n_oos": 0, "coverage": 0.95, "in_scope_accuracy": 0.9, "needs_review_rate": 0.07}
REPORTS = {
    "train": {"test": {"accuracy": 0.93, "macro_f1": 0.92}},
    "eval": {
        "test": {"accuracy": 0.9418, "macro_f1": 0.9417, "ece": 0.0116, "n": 400, "worst_class_f1": 0.5},
        "operating_point": {"in_scope_accuracy": 0.9, "coverage": 0.94, "needs_review_rate": 0.035},
        "baseline_accuracy": 0.91,
    },
    "per_class": PER_CLASS,
    "errors": {
        "pairs": [{"true": "intent_00", "predicted": "intent_01", "count": 5, "examples": ["a | b", "c"]}],
        "slices": [
            {"slice": "words 0-5", "n": 50, "accuracy": 0.80},
            {"slice": "has digits", "n": 5, "accuracy": 0.2},  # too few rows to name
            {"slice": "words 6-10", "n": 300, "accuracy": 0.95},
        ],
    },
    "calibrate": {
        "target": {"coverage": 0.95},
        "calibration_rows": {
            "source": "val",
            "expected": {"coverage": {"estimate": 0.94, "low": 0.9, "high": 0.97}},
        },
        "warnings": ["coverage may fall short of its target"],
        "val": {**SPLIT, "ece_before": 0.0174, "ece_after": 0.0171},
        "test": {**SPLIT, "ece_before": 0.0101, "ece_after": 0.0099},
    },
    "export": {
        "fp32": {
            "accuracy": 0.9419,
            "macro_f1": 0.9418,
            "bytes": 114_221_897,
            "calibration": {"ece": 0.0116},
        },
        "int8": {
            "accuracy": 0.9416,
            "macro_f1": 0.9415,
            "bytes": 46_823_021,
            "calibration": {"ece": 0.0134},
            "argmax_agreement_with_fp32": 0.9929,
            "max_abs_prob_diff_vs_fp32": 0.1527,
            "calibration_check_val": {"fp32_calibration_holds": False},
        },
    },
    "parity": {"argmax_agreement": 1.0, "max_abs_prob_diff": 2.1e-6},
    "variant_check": {"drop_pt": 0.03, "max_drop_pt": 0.5, "fit": True},
}
SIZES = {"train": 8989, "val": 1003, "test": 3080}
SHA = {"data/processed/test.parquet": "f" * 64}


def render(card=CARD, reports=REPORTS, sizes=SIZES) -> str:
    return render_card(card_context(card, reports, sizes, 77, SHA))


def test_every_section_is_filled_from_full_reports():
    text = render()
    for heading in (
        "## Intended use",
        "## Out-of-scope use",
        "## Data",
        "## Metrics (test split)",
        "### The 10 weakest intents (test F1)",
        "## Calibration",
        "## Out-of-scope operating point",
        "## fp32 vs int8",
        "## Known limitations",
        "## How to reproduce",
    ):
        assert heading in text
    assert "not available" not in text.lower() and "not measured" not in text.lower()
    # Data: from config, licence and source included.
    assert "| source | somedata (https://example.org/d) |" in text and "| licence | CC BY 9.9 |" in text
    assert "train 8989, val 1003, test 3080" in text and "| intents | 77 |" in text
    # Metrics and the 10 worst intents, lowest F1 first.
    assert "| accuracy | 0.9418 |" in text and "| macro F1 | 0.9417 |" in text
    worst = text.split("weakest intents")[1].split("## Calibration")[0]
    rows = [line for line in worst.splitlines() if line.startswith("| intent_")]
    assert [r.split(" | ")[0] for r in rows] == [f"| intent_{i:02d}" for i in range(10)]
    # Calibration, operating point, int8.
    assert "| test | 0.0101 | 0.0099 |" in text and "T = 1.250" in text
    assert "Method **energy**, threshold -9.5000, chosen on val rows" in text and "coverage 95 %" in text
    assert "no out-of-scope rows" in text
    assert "| int8 | 0.9416 | 0.9415 | 0.0134 | 46.8 MB |" in text and "fit to serve" in text
    # Limitations: the pair (pipes escaped), the weak slice with enough rows, an intent that attracts others'.
    assert "| intent_00 | intent_01 | 5 | a \\| b |" in text
    assert 'Weaker on "words 0-5"' in text and "has digits" not in text
    assert "`intent_03` attracts" in text and "coverage may fall short" in text
    # Reproduce: revision (dirty said plainly), params hash, inputs, command.
    assert "`abc123+dirty`" in text and "**dirty**" in text
    assert params_sha256(PARAMS) in text and f"`{'f' * 64}`" in text and "dvc repro export" in text


def test_missing_optional_reports_render_a_line_each():
    """Export without evaluate, calibrate or an int8 graph, and a dataset without a stated licence."""
    card = copy.deepcopy(CARD) | {"calibration": {"temperature": 1.0, "out_of_scope": {}, "review": {}}}
    card["params"] = {"data": {"name": "csv", "licence": None, "source_url": None}}
    reports = {
        "train": None,
        "eval": None,
        "per_class": None,
        "errors": None,
        "calibrate": None,
        "export": {"fp32": {"accuracy": 0.9, "macro_f1": 0.9, "bytes": 10}},
        "parity": {"argmax_agreement": 1.0, "max_abs_prob_diff": 0.0},
        "variant_check": None,
    }
    text = render(card, reports)
    assert "not stated: set `data.licence`" in text
    assert "Not measured: neither `evaluate`'s nor `train`'s report" in text
    assert "Not available: `evaluate`'s per-intent report was missing" in text
    assert "ECE before and after: not measured" in text
    assert "No out-of-scope detector" in text
    assert "No int8 graph in this bundle" in text
    assert "The error analysis was not available" in text
    assert "None" not in text


def test_out_of_scope_rows_report_recall_against_its_target():
    reports = copy.deepcopy(REPORTS)
    reports["calibrate"]["target"] = {"oos_recall": 0.6}
    reports["calibrate"]["test"] |= {"n_oos": 1000, "oos_recall": 0.71}
    text = render(reports=reports)
    assert "for oos recall 60 %" in text and "| test | 400 | 1000 | 95.0 % | 71.0 % |" in text


def test_train_metrics_stand_in_when_evaluate_did_not_run():
    reports = REPORTS | {"eval": None}
    text = render(reports=reports)
    assert "| accuracy | 0.9300 |" in text and "From `train`'s report" in text


def test_params_hash_is_canonical():
    assert params_sha256({"a": 1, "b": {"c": 2}}) == params_sha256({"b": {"c": 2}, "a": 1})
    assert params_sha256({"a": 1}) != params_sha256({"a": 2})


@pytest.mark.parametrize("key", ["export", "parity"])
def test_export_s_own_figures_are_required(key):
    with pytest.raises(KeyError):
        card_context(CARD, {k: v for k, v in REPORTS.items() if k != key}, SIZES, 77, SHA)

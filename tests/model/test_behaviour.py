"""Behavioural tests (invariance, directional, minimum functionality) on a small model trained here."""

from __future__ import annotations

import numpy as np
import pytest


def intents(predictor, texts):
    return [p["intent"] for p in predictor.predict(texts)]


def test_fixture_model_learns(trained):
    _, metrics = trained
    assert metrics["test"]["accuracy"] >= 0.9
    assert metrics["size"]["params"] > 0 and metrics["inference_ms_per_sentence"] > 0


@pytest.mark.parametrize(
    "text, intent",
    [
        ("my card was stolen", "lost_or_stolen_card"),
        ("when will my card arrive", "card_arrival"),
        ("what is the exchange rate for euros", "exchange_rate"),
        ("my top up failed", "top_up_failed"),
        ("my balance did not update after the bank transfer", "balance_not_updated_after_bank_transfer"),
    ],
)
def test_minimum_functionality(trained, text, intent):
    predictor, _ = trained
    assert intents(predictor, [text]) == [intent]


@pytest.mark.parametrize(
    "base, variants",
    [
        (
            "i lost my card",
            ["I LOST MY CARD", "I lost my card!", "i lost my card.", "i lsot my card", "i lost my crad"],
        ),
        (
            "my top up failed",
            ["My Top Up Failed", "my top up failed?!", "my top up fialed", "my top-up failed"],
        ),
        (
            "what is the current exchange rate",
            [
                "WHAT IS THE CURRENT EXCHANGE RATE",
                "what's the current exchange rate?",
                "what is the curent exchange rate",
            ],
        ),
    ],
)
def test_invariance_to_case_punctuation_typos(trained, base, variants):
    predictor, _ = trained
    expected = intents(predictor, [base])[0]
    assert intents(predictor, variants) == [expected] * len(variants)


def test_directional_more_evidence_raises_confidence(trained):
    """Adding words that name the intent must not lower the model's confidence in it."""
    predictor, _ = trained
    k = predictor.labels.index("lost_or_stolen_card")
    weak, strong = predictor.predict_proba(["my card", "my card was stolen, please block it"])[:, k]
    assert strong > weak


def test_directional_changing_the_key_phrase_changes_the_intent(trained):
    predictor, _ = trained
    a, b = intents(predictor, ["my card has not arrived yet", "my card was stolen yesterday"])
    assert (a, b) == ("card_arrival", "lost_or_stolen_card")


def test_predict_proba_rows_are_distributions(trained):
    predictor, _ = trained
    proba = predictor.predict_proba(["hello", "my top up failed", ""])
    assert proba.shape == (3, len(predictor.labels))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    top = predictor.predict(["my top up failed"], top_k=3)[0]
    assert [t["confidence"] for t in top["top_k"]] == sorted(
        (t["confidence"] for t in top["top_k"]), reverse=True
    )
    assert top["confidence"] == top["top_k"][0]["confidence"]

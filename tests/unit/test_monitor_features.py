"""Monitoring features: computed from the text, but never carrying it."""

import math

import pytest

from intentops.monitor.features import (
    PREDICTION_FEATURES,
    TEXT_FEATURES,
    build_vocab,
    prediction_features,
    tokenize,
    utterance_features,
)

VOCAB = build_vocab(["my card has not arrived", "my card is lost", "top up of 20 failed"], min_count=1)


def test_tokenize_lowercases_and_folds_digits():
    assert tokenize("My PIN 1234 isn't working!") == ["my", "pin", "0000", "isn't", "working"]


def test_build_vocab_min_count_drops_rare_tokens():
    assert build_vocab(["a b", "a c"], min_count=2) == {"a"}


@pytest.mark.parametrize(
    ("text", "has_amount"),
    [
        ("I tried to top up £20", 1),
        ("send 50$ please", 1),
        ("it cost 100 euros", 1),
        ("charged EUR 12.50 twice", 1),
        ("I paid 3 USD", 1),
        ("my pin is 1234", 0),
        ("how much does it cost", 0),
        ("the euro exchange rate", 0),
    ],
)
def test_has_amount_needs_a_currency_and_a_number(text, has_amount):
    assert utterance_features([text], VOCAB)["has_amount"].item() == has_amount


def test_text_features_of_known_utterances():
    df = utterance_features(["my card has not arrived", "My quokka 42 vanished", ""], VOCAB)
    assert list(df.columns) == list(TEXT_FEATURES)
    assert df["length_chars"].tolist() == [23, 21, 0]
    assert df["length_tokens"].tolist() == [5, 4, 0]
    # "my" is known, and so is "00": digits fold to 0, so 42 matches the 20 seen in training.
    assert df["oov_rate"].tolist() == [0.0, 0.5, 0.0]
    assert df["has_digits"].tolist() == [0, 1, 0]
    assert str(df["length_chars"].dtype) == "int64"


def test_no_raw_text_in_features():
    sentinel = "zebra-sentinel-utterance"
    df = utterance_features([sentinel], VOCAB, [{"intent": "card_arrival", "confidence": 0.9}])
    assert sentinel not in df.to_csv()
    assert all(sentinel not in str(v) for v in df.iloc[0].tolist())


def test_prediction_features_margin_from_top_k():
    pred = {
        "intent": "card_arrival",
        "confidence": 0.6,
        "top_k": [
            {"intent": "card_arrival", "score": 0.6},
            {"intent": "card_delivery_estimate", "score": 0.25},
        ],
    }
    feats = prediction_features(pred)
    assert feats["predicted_intent"] == "card_arrival"
    assert math.isclose(feats["margin"], 0.35)
    assert prediction_features({"intent": "x", "confidence": 0.7})["margin"] == 0.7


def test_utterance_features_with_predictions_and_length_mismatch():
    preds = [{"intent": "lost_or_stolen_card", "confidence": 0.8}]
    df = utterance_features(["my card is lost"], VOCAB, preds)
    assert list(df.columns) == [*TEXT_FEATURES, *PREDICTION_FEATURES]
    with pytest.raises(ValueError, match="1 texts but 2 predictions"):
        utterance_features(["a"], VOCAB, preds * 2)


def test_reference_and_serving_see_the_same_prediction_features():
    """The profile stage feeds Predictor.predict rows; serving feeds its queue-shaped rows (serve_api.store_top_k)."""
    from intentops.feedback.ledger import store_top_k

    predictor_row = {
        "intent": "card_arrival",
        "confidence": 0.6,
        "top_k": [
            {"intent": "card_arrival", "confidence": 0.6},
            {"intent": "pin_blocked", "confidence": 0.25},
        ],
    }
    serving_row = {"intent": "card_arrival", "confidence": 0.6, "top_k": store_top_k(predictor_row)}
    assert prediction_features(predictor_row) == prediction_features(serving_row)
    reference = utterance_features(["my card"], VOCAB, [predictor_row])
    live = utterance_features(["my card"], VOCAB, [serving_row])
    assert reference.equals(live) and list(live.columns) == [*TEXT_FEATURES, *PREDICTION_FEATURES]

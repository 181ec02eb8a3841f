"""Per-utterance monitoring features that describe a message without keeping its text.

Profiles of these features (see `profiles.py`) are what production monitoring stores; the raw
utterance never leaves this module.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from intentops.data.text import DIGIT, has_amount, has_digits

# Simple word tokens; digits are folded to 0 so that "£20" and "£50" share a vocabulary entry.
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
TEXT_FEATURES = ("length_chars", "length_tokens", "oov_rate", "has_digits", "has_amount")
PREDICTION_FEATURES = ("predicted_intent", "confidence", "margin")
# From rows that carry the review `reason` (Predictor.predict, serving): what the label-free accuracy estimate
# (performance.py) needs. `review_reason` is the reason or "none"; `in_scope_confidence` is the confidence of rows
# NOT flagged out_of_distribution and NaN otherwise (whylogs' distribution skips NaN), so a profile gives the
# mean and variance of the confidences that are trustworthy on their own.
FLAG_FEATURES = ("review_reason", "in_scope_confidence")
NO_REASON = "none"
OUT_OF_DISTRIBUTION = "out_of_distribution"
# The only string-valued features; every other column is numeric. Profiles refuse other string columns.
CATEGORICAL_FEATURES = ("predicted_intent", "review_reason")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens with every digit replaced by 0."""
    return _TOKEN.findall(DIGIT.sub("0", text.lower()))


def build_vocab(texts: Iterable[str], min_count: int = 1) -> frozenset[str]:
    """The training vocabulary: tokens seen at least `min_count` times in `texts`."""
    counts = Counter(tok for text in texts for tok in tokenize(text))
    return frozenset(tok for tok, n in counts.items() if n >= min_count)


def text_features(text: str, vocab: frozenset[str] | set[str]) -> dict[str, Any]:
    """The features of one utterance; an utterance without tokens has an OOV rate of 0."""
    tokens = tokenize(text)
    oov = sum(tok not in vocab for tok in tokens)
    return {
        "length_chars": len(text),
        "length_tokens": len(tokens),
        "oov_rate": oov / len(tokens) if tokens else 0.0,
        "has_digits": int(has_digits(text)),
        "has_amount": int(has_amount(text)),
    }


def prediction_features(prediction: Mapping[str, Any]) -> dict[str, Any]:
    """Features of one model output.

    Args:
        prediction: `{"intent": str, "confidence": float, "top_k": [{"intent": str, "score": float}, ...]}`,
            the shape the review queue stores (`Predictor.predict`'s `"confidence"` in place of `"score"` works
            too); `top_k` is optional and sorted best first.

    Returns:
        predicted intent, confidence, and the top-1 minus top-2 score margin (the confidence itself
        when fewer than two scores are given); FLAG_FEATURES too when the prediction has a `reason` key.
    """
    confidence = float(prediction["confidence"])
    scores = [float(k["score"] if "score" in k else k["confidence"]) for k in prediction.get("top_k") or []]
    margin = scores[0] - scores[1] if len(scores) >= 2 else confidence
    feats: dict[str, Any] = {
        "predicted_intent": str(prediction["intent"]),
        "confidence": confidence,
        "margin": margin,
    }
    if "reason" in prediction:
        reason = prediction["reason"] or NO_REASON
        feats["review_reason"] = str(reason)
        feats["in_scope_confidence"] = float("nan") if reason == OUT_OF_DISTRIBUTION else confidence
    return feats


def utterance_features(
    texts: Sequence[str],
    vocab: frozenset[str] | set[str],
    predictions: Sequence[Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """One row of features per utterance, without the text.

    Args:
        texts: the utterances.
        vocab: the training vocabulary from `build_vocab`.
        predictions: optional model outputs aligned with `texts` (see `prediction_features`).

    Returns:
        columns TEXT_FEATURES, then PREDICTION_FEATURES when `predictions` is given, then FLAG_FEATURES
        when every prediction has a `reason` (one frame never mixes rows with and without them).
    """
    if predictions is not None and len(predictions) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(predictions)} predictions")
    rows = [text_features(t, vocab) for t in texts]
    if predictions is not None:
        rows = [{**r, **prediction_features(p)} for r, p in zip(rows, predictions, strict=True)]
    columns = list(TEXT_FEATURES) + (list(PREDICTION_FEATURES) if predictions is not None else [])
    if predictions and all("reason" in p for p in predictions):
        columns += list(FLAG_FEATURES)
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({c: "int64" for c in ("length_chars", "length_tokens", "has_digits", "has_amount")})

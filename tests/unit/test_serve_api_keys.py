"""The API's pure parts: API-key checks (header forms, rotation), calibration settings, rows for the ledger."""

from intentops.api.middleware import api_key_ok


def test_key_forms_and_rotation():
    assert api_key_ok([(b"x-api-key", b"new")], "new")
    assert api_key_ok([(b"authorization", b"Bearer new")], "new")
    assert api_key_ok([(b"authorization", b"bearer old ")], "old, new")
    assert api_key_ok([(b"x-api-key", b"new")], "old,new")
    assert not api_key_ok([(b"x-api-key", b"nope")], "old,new")
    assert not api_key_ok([(b"authorization", b"Basic new")], "new")
    assert not api_key_ok([(b"x-other", b"new")], "new")
    assert not api_key_ok([], "new")


def test_bundle_calibration_wins_and_the_config_fills_in_review_thresholds():
    from intentops.api.model import serving_calibration

    review = {"min_confidence": 0.83, "min_margin": 0.1}
    cal = {
        "temperature": 1.2,
        "ood": {"method": "energy", "threshold": -6.0, "higher_is_ood": True},
        "review": {"min_confidence": 0.5, "min_margin": 0.05},
    }
    merged, info = serving_calibration(cal, review)
    assert merged["review"] == {"min_confidence": 0.5, "min_margin": 0.05} and merged["ood"] == cal["ood"]
    assert info["source"] == "bundle" and info["out_of_scope"] == cal["ood"] and info["temperature"] == 1.2
    merged, info = serving_calibration({}, review)  # a bundle without calibration: config thresholds, no OOS
    assert merged["review"] == review and info["source"] == "config" and info["out_of_scope"] is None


def test_rows_get_ids_and_only_out_of_scope_ones_are_queued_with_their_reason():
    from intentops.api.schemas import shape_predictions
    from intentops.feedback.ledger import review_items

    top = [{"intent": "card_arrival", "confidence": 0.9}, {"intent": "pin_blocked", "confidence": 0.05}]
    raw = [
        {
            "intent": "card_arrival",
            "confidence": 0.9,
            "top_k": top,
            "out_of_scope": False,
            "reason": None,
            "needs_review": False,
        },
        {
            "intent": "card_arrival",
            "confidence": 0.9,
            "top_k": top,
            "out_of_scope": True,
            "reason": "out_of_distribution",
            "needs_review": True,
        },
    ]
    rows = shape_predictions(raw, "m-1")
    assert len({r["prediction_id"] for r in rows}) == 2 and {r["model_version"] for r in rows} == {"m-1"}
    (item,) = review_items(["my card?", "weather in paris"], rows)
    assert (item["prediction_id"], item["text"], item["reason"]) == (
        rows[1]["prediction_id"],
        "weather in paris",
        "out_of_distribution",
    )
    assert item["top_k"] == [
        {"intent": "card_arrival", "score": 0.9},
        {"intent": "pin_blocked", "score": 0.05},
    ]

"""The served OpenAPI document (intentops.api.openapi): what only the running replica knows, added to FastAPI's."""

from __future__ import annotations

import re

from intentops.api.openapi import api_title, openapi_document
from intentops.api.schemas import CLEAN_PATTERN, TEXT_PATTERN

SETTINGS = {"max_texts": 4, "max_text_chars": 50, "feedback": {"accept_text": True}}


def base() -> dict:
    from intentops.api.service import api

    return api.openapi()


def test_the_title_names_the_dataset_and_the_taxonomy_size():
    assert api_title({"params": {"data": {"name": "clinc150"}}}, ["a"] * 151) == (
        "intentops: clinc150 intents",
        "Intent classification of customer messages into 151 intents of the clinc150 taxonomy",
    )
    title, summary = api_title({"model": "tiny"}, ["a", "b"])
    assert title == "intentops intents" and "2 intents of the served bundle's taxonomy" in summary


def test_limits_taxonomy_and_text_follow_the_settings_without_keys():
    original = base()
    doc = openapi_document(original, {"b", "a"}, {}, SETTINGS, keys_checked=False)
    schemas = doc["components"]["schemas"]
    feedback = schemas["FeedbackRequest"]["properties"]
    assert feedback["label"]["enum"] == ["a", "b"] and feedback["text"]["maxLength"] == 50
    assert schemas["FeedbackRequest"]["examples"][0]["label"] == "a"
    texts = schemas["PredictRequest"]["properties"]["texts"]
    assert (texts["maxItems"], texts["items"]["maxLength"]) == (4, 50)
    assert "securitySchemes" not in doc["components"]
    assert all("401" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    assert "enum" not in original["components"]["schemas"]["FeedbackRequest"]["properties"]["label"]


def test_keys_add_the_schemes_and_401_but_not_on_the_probes():
    doc = openapi_document(base(), {"a"}, {}, SETTINGS, keys_checked=True)
    assert set(doc["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    assert "401" in doc["paths"]["/v1/predict"]["post"]["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_the_text_patterns_match_the_servers_text_rules():
    from intentops.data.text import text_problem

    for text in ["my card", " a ", "tab\there", "top\u00a0up", "emoji \U0001f600", "a\u200db"]:
        assert re.search(TEXT_PATTERN, text) and text_problem(text) is None, text
    for text in ["", "   ", "\u00a0", "a\x00", "b\x1b[2J", "\x85", "\ufffe"]:
        assert not re.search(TEXT_PATTERN, text), text
    assert re.search(CLEAN_PATTERN, " ") and not re.search(CLEAN_PATTERN, "x\x7f")

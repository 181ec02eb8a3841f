"""API votes' pure parts: resolving with `api:` voters, key -> client names, the audit draw, the text opt-in."""

import uuid

import pytest

from intentops.api.middleware import ANONYMOUS, api_client, parse_keys
from intentops.api.schemas import FeedbackRequest, RequestError, feedback_text
from intentops.feedback.audit import wilson
from intentops.feedback.label import resolve
from intentops.feedback.ledger import in_audit


@pytest.mark.parametrize(
    ("votes", "min_votes", "expected"),
    [
        ({"api:a": "x"}, 1, ("x", "api")),  # one honest correction suffices with min_votes 1
        ({"api:a": "x"}, 2, (None, "pending")),
        ({"api:a": "x", "api:b": "x"}, 2, ("x", "api")),
        ({"api:a": "x", "api:b": "y"}, 1, (None, "needs_adjudication")),  # any disagreement
        ({"api:a": "x"}, 0, (None, "pending")),  # 0: never alone
        ({"api:a": "x", "ann": "x"}, 1, (None, "pending")),  # mixed: toward min_annotators (3)
        ({"api:a": "x", "ann": "x", "bob": "y"}, 1, ("x", "majority")),
        ({"api:a": "x", "ann": "y", "bob": "z"}, 1, (None, "needs_adjudication")),
    ],
)
def test_resolve_with_api_votes(votes, min_votes, expected):
    assert resolve(votes, 3, None, min_votes) == expected
    assert resolve(votes, 3, "z", min_votes) == ("z", "adjudicated")


def test_keys_name_their_clients():
    keys = parse_keys("alice=k1, bob=k2,plain, b64pad==,alice=k3")
    names = {name for name, _ in keys}
    assert {"alice", "bob"} <= names and not {"plain", "b64pad"} & names
    assert api_client([(b"x-api-key", b"k1")], keys) == "alice"
    assert api_client([(b"x-api-key", b"k3")], keys) == "alice"  # a rotation under one name
    assert api_client([(b"authorization", b"Bearer k2")], keys) == "bob"
    assert api_client([(b"x-api-key", b"bob=k2")], keys) == "bob"  # the whole entry works too
    plain = api_client([(b"x-api-key", b"plain")], keys)
    padded = api_client([(b"x-api-key", b"b64pad==")], keys)
    assert plain.startswith("key-") and padded.startswith("key-") and plain != padded
    assert api_client([(b"x-api-key", b"k9")], keys) is None and ANONYMOUS == "anonymous"


def test_the_audit_draw_is_the_ids_share():
    ids = [str(uuid.uuid4()) for _ in range(4000)]
    drawn = sum(in_audit(i, 0.25) for i in ids)
    assert 800 < drawn < 1200  # 1000 expected; 6 standard deviations either side
    assert all(in_audit(i, 1.0) for i in ids) and not any(in_audit(i, 0.0) for i in ids)
    assert not in_audit("not-a-uuid", 1.0)


def test_wilson_interval():
    low, high = wilson(8, 10)
    assert 0.49 < low < 0.8 < high < 0.95
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0 and wilson(0, 0) == (None, None)


def test_text_with_a_correction_is_opt_in():
    req = FeedbackRequest(prediction_id="p", label="x", text="my card")
    with pytest.raises(RequestError) as err:
        feedback_text(req, False, 100)
    assert err.value.status == 422 and "accept_text" in err.value.where
    assert feedback_text(req, True, 100) == "my card"
    with pytest.raises(RequestError) as err:
        feedback_text(req, True, 3)
    assert err.value.status == 413
    assert feedback_text(FeedbackRequest(prediction_id="p", label="x"), False, 100) is None
    with pytest.raises(ValueError, match="text"):
        FeedbackRequest(prediction_id="p", label="x", text="bad \x1b[2J")


def test_settings_check_the_audit_share(monkeypatch):
    from intentops.api.settings import load_settings
    from intentops.errors import UserError
    from support import ROOT

    monkeypatch.delenv("INTENTOPS_PARAMS", raising=False)
    settings, _ = load_settings(ROOT, {"store": {"audit_share": 0.5}, "feedback": {"accept_text": True}})
    assert settings["store"]["audit_share"] == 0.5
    with pytest.raises(UserError, match="audit_share"):
        load_settings(ROOT, {"store": {"audit_share": 1.5}})
    with pytest.raises(UserError, match="accept_text"):
        load_settings(ROOT, {"feedback": {"accept_text": "yes"}})

"""API-key checks: header forms, and comma-separated keys for rotation."""

from intentops.serve_api import api_key_ok


def test_key_forms_and_rotation():
    assert api_key_ok([(b"x-api-key", b"new")], "new")
    assert api_key_ok([(b"authorization", b"Bearer new")], "new")
    assert api_key_ok([(b"authorization", b"bearer old ")], "old, new")
    assert api_key_ok([(b"x-api-key", b"new")], "old,new")
    assert not api_key_ok([(b"x-api-key", b"nope")], "old,new")
    assert not api_key_ok([(b"authorization", b"Basic new")], "new")
    assert not api_key_ok([(b"x-other", b"new")], "new")
    assert not api_key_ok([], "new")

"""The loop demo's projects run in a temp dir, so the data mirror it hands them must not be relative."""

from __future__ import annotations

from pathlib import Path

from intentops.loop_demo import _env


def test_relative_local_mirror_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "shared")
    env = _env("./datasets")
    assert env["INTENTOPS_DATA_MIRROR"] == str((tmp_path / "shared" / "datasets").resolve())
    assert Path(env["INTENTOPS_DATA_MIRROR"]).is_absolute()


def test_fsspec_mirror_url_is_passed_through_and_none_sets_nothing(monkeypatch):
    monkeypatch.delenv("INTENTOPS_DATA_MIRROR", raising=False)
    assert _env("s3://bucket/datasets")["INTENTOPS_DATA_MIRROR"] == "s3://bucket/datasets"
    assert "INTENTOPS_DATA_MIRROR" not in _env(None)

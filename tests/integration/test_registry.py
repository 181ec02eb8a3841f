"""The registry on local disk and on S3 (moto's server): stage, promote, rollback, the conditional write that
detects a lost update, a history that cannot be torn, and replicas' fetch into a verified cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from intentops.errors import UserError
from intentops.inference.registry import EVENTS, LEGACY_HISTORY, POINTER, Registry, RegistryConflict
from support import S3_ENV, moto_s3, write_tiny_onnx_bundle

LABELS = ["card_lost", "refund", "greeting"]


@pytest.fixture(scope="module")
def s3():
    env = {**S3_ENV}
    with moto_s3(bucket="registry-test") as url:
        old = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
        os.environ.update({**env, "AWS_ENDPOINT_URL": url})
        try:
            yield url
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry.at(tmp_path / "registry")
    request.getfixturevalue("s3")
    return Registry.at(f"s3://registry-test/{tmp_path.name}")


@pytest.fixture
def bundles(tmp_path) -> dict[str, Path]:
    """Two tiny ONNX bundles with different content, hence different versions: {version: folder}."""
    out = {}
    for confident in (True, False):
        folder = tmp_path / f"bundle-{confident}"
        out[write_tiny_onnx_bundle(folder, LABELS, confident)] = folder
    return out


def test_stage_promote_rollback_list(registry, bundles, tmp_path):
    (a, dir_a), (b, dir_b) = bundles.items()
    registry.stage(dir_a, a, "first")
    assert registry.state().candidate == a and registry.production() is None
    registry.promote()
    registry.stage(dir_b, b, "second")
    assert (registry.production(), registry.state().candidate) == (a, b)
    registry.promote(b)
    assert registry.production() == b and registry.state().candidate is None
    assert registry.rollback() == a and registry.production() == a
    assert sorted(registry.versions()) == sorted([a, b])
    events = registry.history()
    assert [e["event"] for e in events] == ["candidate", "promote", "candidate", "promote", "rollback"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    # The same through the CLI a team runs (any folder: no params.yaml needed with --registry)
    out = _cli(["registry", "list", "--registry", registry.url], tmp_path)
    assert f"* {a}" in out and "rollback" in out
    out = _cli(["rollback", "--registry", registry.url, "--to", b], tmp_path)
    assert f"-> {b}" in out and registry.production() == b


def test_a_lost_update_is_detected(registry, bundles):
    """Two promotions decide on the same state; the second one's conditional write fails, nothing is overwritten."""
    (a, dir_a), (b, dir_b) = bundles.items()
    registry.add(dir_a, a)
    registry.add(dir_b, b)
    registry.set_production(a, "promote", "first")
    seen_by_both = registry.state().seq
    registry.set_production(b, "promote", "the winner", after=seen_by_both)
    with pytest.raises(RegistryConflict, match="changed while"):
        registry.set_production(a, "promote", "the loser", after=seen_by_both)
    assert registry.production() == b
    assert [e["reason"] for e in registry.history()] == ["first", "the winner"]


def test_racing_promotions_one_wins(registry, bundles):
    """Eight threads race to write the same next event: exactly one succeeds, the others see a conflict."""
    versions = list(bundles)
    for version, folder in bundles.items():
        registry.add(folder, version)
    base = registry.state().seq
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def promote(i: int) -> None:
        barrier.wait()
        try:
            registry.set_production(versions[i % 2], "promote", f"thread {i}", after=base)
            outcomes.append("won")
        except RegistryConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    (event,) = registry.history()
    assert registry.production() == event["version"]


def test_the_pointer_ends_at_the_newest_event(registry, bundles):
    """A promotion overtaken between its event and its pointer write leaves the pointer at the newest event."""
    (a, dir_a), (b, dir_b) = bundles.items()
    registry.add(dir_a, a)
    registry.add(dir_b, b)
    registry.set_production(a, "promote", "slow writer")
    registry.set_production(b, "promote", "fast writer")
    registry._write_pointer(a)  # the slow writer's late pointer write  # noqa: SLF001
    assert registry.production() == b


def test_a_torn_history_never_breaks_rollback(tmp_path, bundles):
    """A half-written legacy line and an unreadable event are skipped; rollback still finds the previous version."""
    (a, dir_a), (b, dir_b) = bundles.items()
    registry = Registry.at(tmp_path / "registry")
    registry.add(dir_a, a)
    registry.add(dir_b, b)
    root = registry.root
    (root / LEGACY_HISTORY).write_text(
        json.dumps({"event": "promote", "version": a, "previous": None, "reason": "old"})
        + '\n{"event": "prom'
    )
    (root / POINTER).write_text(a + "\n")
    registry.set_production(b, "promote", "new")
    (root / EVENTS / "00000002.json").write_text('{"event": "promote", "vers')  # torn by hand
    assert registry.production() == b
    assert registry.rollback() == a
    assert registry.state().seq == 3 and registry.production() == a


def test_a_bundle_that_does_not_verify_is_refused(registry, bundles, tmp_path):
    (a, dir_a), (b, _) = bundles.items()
    with pytest.raises(UserError, match="version"):
        registry.add(dir_a, b)  # the files are a's, the name is b's
    registry.stage(dir_a, a, "good")
    registry.promote()
    onnx = next(dir_a.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError):
        registry.add(dir_a, a)  # the local copy changed: verified before anything is uploaded
    assert registry.production() == a


def test_fetch_downloads_verifies_and_caches(s3, bundles, tmp_path):
    import fsspec

    (a, dir_a), (b, dir_b) = bundles.items()
    registry = Registry.at("s3://registry-test/fetch")
    registry.stage(dir_a, a, "a")
    registry.stage(dir_b, b, "b")
    cache = tmp_path / "cache"
    got = registry.fetch(a, cache)
    assert got == cache / a and (got / "manifest.json").is_file()
    # A damaged cached copy is downloaded again.
    onnx = next(got.glob("*.onnx"))
    onnx.write_bytes(b"damaged")
    assert registry.fetch(a, cache) == got and onnx.read_bytes() != b"damaged"
    # A registry copy whose files do not match its version is refused, and nothing is cached for it.
    fs, _ = fsspec.core.url_to_fs(registry.url)
    name = next(dir_b.glob("*.onnx")).name
    fs.pipe_file(f"registry-test/fetch/{b}/{name}", b"not the model")
    with pytest.raises(UserError):
        registry.fetch(b, cache)
    assert not (cache / b).exists()


def test_the_promote_command_reads_the_gate(registry, bundles, tmp_path):
    (a, dir_a), _ = bundles.items()
    registry.stage(dir_a, a, "ci")
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"promoted": False, "challenger": a, "reasons": ["worse"]}))
    failed = _cli(
        ["registry", "promote", "--gate", str(gate), "--registry", registry.url], tmp_path, check=False
    )
    assert "did not promote" in failed and registry.production() is None
    gate.write_text(json.dumps({"promoted": True, "challenger": a, "reasons": ["better"]}))
    assert f"-> {a}" in _cli(
        ["registry", "promote", "--gate", str(gate), "--registry", registry.url], tmp_path
    )
    assert registry.history()[-1]["reason"] == "better"


def test_the_model_card_travels_with_the_bundle(registry, tmp_path, monkeypatch):
    """model_card.md is sealed with the bundle: staged, read on a second machine (a fresh cache) and by
    `intentops registry card`; a version without one says how to get one."""
    from intentops.inference.bundle import MODEL_CARD_FILE, seal
    from intentops.inference.registry import CACHE_ENV

    with_card, without = tmp_path / "with-card", tmp_path / "without"
    a = write_tiny_onnx_bundle(with_card, LABELS, confident=True)
    text = "# Model card: tiny\n\nIntended use: tests.\n"
    (with_card / MODEL_CARD_FILE).write_text(text, encoding="utf-8")
    assert seal(with_card) == a  # the card is not part of the version
    b = write_tiny_onnx_bundle(without, LABELS, confident=False)
    registry.stage(with_card, a, "with a card")
    registry.stage(without, b, "without")
    assert registry.model_card(a, tmp_path / "second-machine") == text
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cli-cache"))
    registry.promote(a)
    # stdout is the card, whole (a remote registry's client may log to stderr after it)
    assert _cli(["registry", "card", "--registry", registry.url], tmp_path).startswith(text)
    with pytest.raises(UserError, match=f"no {MODEL_CARD_FILE}") as exc:
        registry.model_card(b, tmp_path / "second-machine")
    assert "dvc repro export" in exc.value.fix
    assert "no model_card.md" in _cli(
        ["registry", "card", b, "--registry", registry.url], tmp_path, check=False
    )


def _cli(args: list[str], cwd: Path, check: bool = True) -> str:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "intentops"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_moves_are_refused_where_the_conditional_write_is_not_proven(bundles):
    """fsspec's in-memory filesystem reads fine, but nothing shows it honours create-only: no move there."""
    (a, dir_a), _ = bundles.items()
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(dir_a), f"/reg/{a}", recursive=True)
    registry = Registry.at("memory://reg")
    assert registry.versions() == [a] and registry.production() is None
    with pytest.raises(UserError, match="create-only"):
        registry.set_production(a, "promote", "untested backend")

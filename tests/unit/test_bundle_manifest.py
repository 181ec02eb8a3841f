"""The bundle manifest: seal writes it, verify_bundle refuses every change before anything is loaded."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from intentops.errors import UserError
from intentops.inference.bundle import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    content_version,
    seal,
    verify_bundle,
    write_manifest,
)
from support import write_tiny_onnx_bundle

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
REVIEW = {"review": {"min_confidence": 0.83, "min_margin": 0.10}}  # serving's default thresholds


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> tuple[Path, str]:
    """(folder, version) of one tiny ONNX bundle, sealed; tests change copies of it."""
    dest = tmp_path_factory.mktemp("sealed") / "bundle"
    return dest, write_tiny_onnx_bundle(dest, LABELS, confident=True, card={"metrics": {"f1": 0.5}})


@pytest.fixture
def bundle(sealed, tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(sealed[0], dest)
    return dest


def refused(bundle: Path, names: str, expected_version: str | None = None) -> UserError:
    """verify_bundle's error, which must name `names` in its message or its `where`."""
    with pytest.raises(UserError) as exc:
        verify_bundle(bundle, expected_version)
    assert names in exc.value.render(), exc.value.render()
    return exc.value


def flip_byte(path: Path, offset: int = -2) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_seal_then_verify_passes_and_lists_every_file(sealed):
    bundle, version = sealed
    meta = verify_bundle(bundle, expected_version=version)
    assert meta["format"] == "onnx" and meta["version"] == version == content_version(bundle)
    assert json.loads((bundle / "card.json").read_text())["version"] == version
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    names = sorted(p.name for p in bundle.iterdir() if p.name != MANIFEST_FILE)
    assert list(manifest["files"]) == names and "bundle.json" in names
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (bundle / name).stat().st_size and len(entry["sha256"]) == 64


def test_tiny_bundles_are_confident_or_not_and_differ_in_version(sealed, tmp_path):
    from intentops.inference.predictor import OnnxPredictor, Predictor

    texts = ["my card has not arrived", "what is the weather", "x" * 500]
    sure = Predictor.load(sealed[0]).with_calibration(REVIEW).predict(texts)
    unsure_version = write_tiny_onnx_bundle(tmp_path / "unsure", LABELS, confident=False)
    unsure = Predictor.load(tmp_path / "unsure")
    assert isinstance(unsure, OnnxPredictor) and unsure_version != sealed[1]
    assert all(p["intent"] == LABELS[0] and p["confidence"] > 0.99 and not p["needs_review"] for p in sure)
    assert all(
        p["needs_review"] and p["confidence"] < 0.5 for p in unsure.with_calibration(REVIEW).predict(texts)
    )


@pytest.mark.parametrize("name", ["bundle.json", "model.onnx", "tfidf.joblib", "card.json"])
def test_a_changed_byte_is_refused(bundle, name):
    flip_byte(bundle / name)
    assert "changed" in refused(bundle, name).what


def test_the_model_card_is_sealed_but_outside_the_version(bundle, sealed):
    """model_card.md, like card.json: in the manifest (a changed byte is refused), not in the content version."""
    (bundle / MODEL_CARD_FILE).write_text("# Model card\n", encoding="utf-8")
    assert seal(bundle) == sealed[1]
    assert verify_bundle(bundle, expected_version=sealed[1])["version"] == sealed[1]
    flip_byte(bundle / MODEL_CARD_FILE)
    assert "changed" in refused(bundle, MODEL_CARD_FILE).what


def test_a_changed_size_is_refused(bundle):
    with open(bundle / "labels.json", "a") as fh:
        fh.write(" ")
    assert "bytes" in refused(bundle, "labels.json").what


def test_an_extra_file_is_refused(bundle):
    (bundle / "extra.joblib").write_bytes(b"anything")
    assert "extra file" in refused(bundle, "extra.joblib").what


def test_a_missing_file_is_refused(bundle):
    (bundle / "tokenizer.json").unlink()
    assert "missing" in refused(bundle, "tokenizer.json").what


def test_a_missing_or_unreadable_manifest_is_refused(bundle):
    (bundle / MANIFEST_FILE).write_text("{not json")
    assert "unreadable" in refused(bundle, MANIFEST_FILE).what
    (bundle / MANIFEST_FILE).unlink()
    assert "no manifest" in refused(bundle, MANIFEST_FILE).what


def test_a_version_other_than_the_expected_one_is_refused(bundle, sealed):
    err = refused(bundle, "m-000000000000", expected_version="m-000000000000")
    assert err.where == str(bundle) and sealed[1] in err.what


def test_a_version_that_is_not_the_files_is_refused_even_with_a_fresh_manifest(bundle):
    """bundle.json's version is recomputed from the manifest, not trusted."""
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "version": "m-000000000000"}))
    write_manifest(bundle)
    assert "bundle.json says version 'm-000000000000'" in refused(bundle, "bundle.json").what


def test_a_consistent_rewrite_is_caught_only_by_a_pinned_version(bundle, sealed):
    """The manifest is not signed: a resealed change verifies alone, but not as the version the caller expects."""
    (bundle / "calibration.json").write_text(json.dumps({"temperature": 9.0, "ood": {}}))
    new = seal(bundle)
    assert new != sealed[1] and verify_bundle(bundle)["version"] == new
    refused(bundle, sealed[1], expected_version=sealed[1])


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinks_are_refused(bundle, tmp_path, target):
    """A symlinked file, even one with the right bytes, is refused (one to outside the folder could change)."""
    labels = bundle / "labels.json"
    if target == "outside":
        real = tmp_path / "labels-elsewhere.json"
        shutil.copyfile(labels, real)
    else:
        real = bundle / "labels.copy"
        shutil.copyfile(labels, real)
    labels.unlink()
    labels.symlink_to(real)
    assert "symlink" in refused(bundle, "labels.json").what


def test_unknown_files_in_an_onnx_bundle_are_refused_even_when_listed(bundle):
    (bundle / "evil.onnx").write_bytes(b"graph")
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "model_file": "evil.onnx"}))
    write_manifest(bundle)
    assert "holds and names only" in refused(bundle, "evil.onnx").what


class CreatesFileWhenUnpickled:
    """A pickle whose loading creates `marker`: what a tampered tfidf.joblib could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_tampered_pickle_is_refused_before_anything_is_unpickled(bundle, tmp_path):
    import joblib

    marker = tmp_path / "unpickled.marker"
    with open(bundle / "tfidf.joblib", "wb") as fh:
        pickle.dump(CreatesFileWhenUnpickled(marker), fh)
    refused(bundle, "tfidf.joblib")
    assert not marker.exists()  # verification hashed the file, never loaded it
    joblib.load(bundle / "tfidf.joblib").close()  # the pickle is live: loading it does create the marker
    assert marker.exists()


def test_torch_bundles_get_a_manifest_checked_file_by_file(tmp_path):
    """TorchPredictor.save writes the manifest; a torch bundle has no content version, so none can be pinned."""
    import torch

    from intentops.inference.predictor import TorchPredictor

    TorchPredictor({"featurizer": "any pickle"}, torch.nn.Linear(2, 3), LABELS).save(tmp_path, {}, {})
    assert verify_bundle(tmp_path)["format"] == "torch"
    refused(tmp_path, "no content version", expected_version="m-000000000000")
    flip_byte(tmp_path / "featurizer.joblib")
    refused(tmp_path, "featurizer.joblib")


def test_a_folder_in_the_bundle_is_refused(bundle):
    os.mkdir(bundle / "sub")
    assert "folder" in refused(bundle, "sub").what


def test_registry_add_verifies_the_bundle_and_its_copy(sealed, bundle, tmp_path):
    from intentops.inference.registry import Registry

    source, version = sealed
    registry = Registry.at(tmp_path / "registry")
    dest = registry.add(source, version)
    assert dest == registry.root / version and verify_bundle(dest, version)["version"] == version
    with pytest.raises(UserError, match="expected version"):  # the folder name must be the version
        registry.add(source, "m-000000000000")
    flip_byte(bundle / "model.onnx")
    with pytest.raises(UserError, match="model.onnx"):
        registry.add(bundle, version)
    assert registry.versions() == [version]
    verify_bundle(dest, version)  # the registered copy is untouched


def test_registry_add_replaces_a_copy_that_does_not_verify(sealed, tmp_path):
    """A version folder from an older export (no manifest) is replaced, not kept."""
    from intentops.inference.registry import Registry

    source, version = sealed
    registry = Registry.at(tmp_path / "registry")
    old = registry.root / version
    shutil.copytree(source, old)
    (old / MANIFEST_FILE).unlink()
    (old / "stale.txt").write_text("left by an older export")
    registry.add(source, version)
    assert verify_bundle(old, version)["version"] == version and not (old / "stale.txt").exists()
    assert registry.versions() == [version]

"""The bundle's file layout, and its content version: the only place that names the files in a bundle.

Torch bundles (`train`): bundle.json (format "torch"), featurizer.joblib, net.pt.
ONNX bundles (`export`): bundle.json (format "onnx"), model.onnx [+ model.int8.onnx], tokenizer.json,
tfidf.joblib, labels.json, calibration.json [+ ood_stats.npz], card.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from intentops.errors import UserError

BUNDLE_META = "bundle.json"
FEATURIZER_FILE = "featurizer.joblib"
WEIGHTS_FILE = "net.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
TFIDF_FILE = "tfidf.joblib"
LABELS_FILE = "labels.json"
CALIBRATION_FILE = "calibration.json"
OOD_STATS_FILE = "ood_stats.npz"
CARD_FILE = "card.json"
# The files that decide what an ONNX bundle predicts; the card (git revision, timings) is left out of the version.
VERSIONED_FILES = (
    ONNX_FILE,
    INT8_FILE,
    TOKENIZER_FILE,
    TFIDF_FILE,
    LABELS_FILE,
    CALIBRATION_FILE,
    OOD_STATS_FILE,
)


def read_meta(bundle_dir: str | os.PathLike) -> dict:
    """The bundle record (bundle.json), or a UserError saying how to get a bundle."""
    path = Path(bundle_dir) / BUNDLE_META
    if not path.is_file():
        raise UserError(
            f"no model bundle at {bundle_dir}",
            where=str(path),
            fix="run the `train` stage (dvc repro train) or point at a folder it wrote",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_json_file(path: Path) -> dict | list | None:
    """A JSON file of the bundle, or None when it is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_version(bundle_dir: Path, files: tuple[str, ...] = VERSIONED_FILES) -> str:
    """ "m-" + 12 hex of sha256 over the named files that exist (name and bytes): same content, same version."""
    manifest = "".join(
        f"{name} {file_sha256(bundle_dir / name)}\n" for name in files if (bundle_dir / name).is_file()
    )
    return "m-" + hashlib.sha256(manifest.encode()).hexdigest()[:12]

"""The bundle's file layout, its content version and its manifest: the only place that names the files in a bundle.

Torch bundles (`train`): bundle.json (format "torch"), featurizer.joblib, net.pt, manifest.json.
ONNX bundles (`export`): bundle.json (format "onnx"), model.onnx [+ model.int8.onnx], tokenizer.json,
tfidf.joblib, labels.json, calibration.json [+ ood_stats.npz], card.json, model_card.md, manifest.json.

The manifest (manifest.json) lists every other file of the bundle with its size in bytes and its full sha256,
bundle.json, card.json and model_card.md included. `verify_bundle` checks it before anything in the bundle is
unpickled or parsed (only bundle.json is read, as JSON, once its hash matched); `seal` writes it. What a bundle
that verifies is known to be:

- complete and unchanged since it was sealed: no file missing, none added, none truncated or edited (a partial
  copy, a bit flip, a pickle dropped in next to the others); only regular files, no symlinks, no folders;
- for an ONNX bundle, consistent: the content version ("m-" + 12 hex of sha256 over the files that decide
  predictions, VERSIONED_FILES) is recomputed from the manifest's hashes and must equal bundle.json's, and the
  version a caller pins (the registry folder, the production pointer), when it pins one; an ONNX bundle holds
  only the files named above, and its bundle.json names its graphs among them.

What it does not guarantee: who wrote the bundle. The manifest is not signed, so whoever can write the folder
can rewrite a file, bundle.json's version and the manifest consistently. That is why the version is recomputed
from the manifest rather than read from bundle.json: such a rewrite of a file that decides predictions changes
the version, which is caught only when the caller pins the version it expects (the registry does; a bundle
served from a plain folder is not pinned). A consistent rewrite of a file outside the version (bundle.json's
other fields, card.json, model_card.md) is not caught at all; they hold no code or weights, but bundle.json's
"format" decides how the rest is loaded. A torch bundle (whose featurizer is a pickle) has no content version: it is checked file
by file only and refused when a version is pinned, which, with serving loading ONNX bundles only unless
`serving.allow_torch_bundles` says otherwise, keeps a rewrite to "torch" from running a pickle. Files are hashed,
then loaded: a writer racing the loader between the two is not caught either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from intentops.errors import UserError
from intentops.io import write_json

BUNDLE_META = "bundle.json"
MANIFEST_FILE = "manifest.json"
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
# The human-readable model card export renders (intended use, data, metrics, limitations, how to reproduce);
# like card.json it describes the model and is left out of the version.
MODEL_CARD_FILE = "model_card.md"
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
ONNX_BUNDLE_FILES = frozenset((BUNDLE_META, CARD_FILE, MODEL_CARD_FILE, *VERSIONED_FILES))
MANIFEST_SCHEMA = 1
_RESEAL = (
    "re-write the bundle with this version of intentops (`dvc repro export`, or `dvc repro train` for a torch "
    "bundle) and copy it again; never edit a bundle's files by hand"
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


def read_model_card(bundle_dir: str | os.PathLike) -> str:
    """The bundle's model_card.md; a UserError when the bundle has none (exported before cards were rendered)."""
    path = Path(bundle_dir) / MODEL_CARD_FILE
    if not path.is_file():
        raise UserError(
            f"the bundle has no {MODEL_CARD_FILE}",
            where=str(path),
            fix=f"re-export it (`dvc repro export`) to render one; {CARD_FILE} holds the machine-readable card",
        )
    return path.read_text(encoding="utf-8")


def file_sha256(path: str | os.PathLike, follow_symlinks: bool = True) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; with follow_symlinks=False a symlink fails to open (OSError)."""
    flags = os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, flags), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def version_of(hashes: Mapping[str, str], files: tuple[str, ...] = VERSIONED_FILES) -> str:
    """The content version from {file name: hex sha256}: "m-" + 12 hex of sha256 over the named files present."""
    lines = "".join(f"{name} {hashes[name]}\n" for name in files if name in hashes)
    return "m-" + hashlib.sha256(lines.encode()).hexdigest()[:12]


def content_version(bundle_dir: Path, files: tuple[str, ...] = VERSIONED_FILES) -> str:
    """ "m-" + 12 hex of sha256 over the named files that exist (name and bytes): same content, same version."""
    return version_of(
        {name: file_sha256(bundle_dir / name) for name in files if (bundle_dir / name).is_file()}, files
    )


def bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """The names of the bundle's files, sorted, the manifest left out; a symlink or a folder in it is refused."""
    root = Path(bundle_dir)
    names = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                kind = "symlink" if entry.is_symlink() else "folder or special file"
                raise UserError(
                    f"the bundle holds a {kind}, {entry.name!r}: a bundle holds regular files only",
                    where=str(root / entry.name),
                    fix=f"remove it; {_RESEAL}",
                )
            if entry.name != MANIFEST_FILE:
                names.append(entry.name)
    return sorted(names)


def write_manifest(bundle_dir: str | os.PathLike) -> dict:
    """Write manifest.json (atomically): every other file of the bundle, sorted, with its size and sha256.

    Returns:
        {"manifest": 1, "algorithm": "sha256", "files": {name: {"bytes": int, "sha256": hex}}}
    """
    root = Path(bundle_dir)
    files = {
        name: {
            "bytes": (root / name).stat().st_size,
            "sha256": file_sha256(root / name, follow_symlinks=False),
        }
        for name in bundle_files(root)
    }
    manifest = {"manifest": MANIFEST_SCHEMA, "algorithm": "sha256", "files": files}
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


def seal(bundle_dir: str | os.PathLike) -> str:
    """Write the content version into bundle.json (and card.json when there is one), then the manifest.

    The last step of writing an ONNX bundle, and the one after changing a file of it on purpose.

    Returns:
        the content version ("m-" + 12 hex).
    """
    root = Path(bundle_dir)
    version = content_version(root)
    write_json(root / BUNDLE_META, {**read_meta(root), "version": version})
    card = read_json_file(root / CARD_FILE)
    if card is not None:
        write_json(root / CARD_FILE, {**card, "version": version})
    write_manifest(root)
    return version


def verify_bundle(bundle_dir: str | os.PathLike, expected_version: str | None = None) -> dict:
    """Check a bundle against its manifest (hashes only, nothing loaded); returns its bundle.json.

    Args:
        bundle_dir: the bundle folder.
        expected_version: the version the caller trusts the bundle to be (a registry folder name, the
            production pointer); None pins nothing.

    Raises:
        UserError naming the file when the manifest is missing or unreadable, a file is missing, unlisted,
        of another size or hash, or (ONNX) the version recomputed from the manifest is not bundle.json's or
        `expected_version`; also when a version is pinned on a bundle that has none (torch).
    """
    root = Path(bundle_dir)
    listed = read_manifest(root)
    check_listing(root, listed)
    check_hashes(root, listed)
    meta = parse_meta(root, listed)
    check_version(root, meta, listed, expected_version)
    return meta


def read_manifest(root: Path) -> dict[str, dict]:
    """The manifest's {file name: {"bytes", "sha256"}}; a UserError when it is missing or malformed."""
    path = root / MANIFEST_FILE
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
        files = dict(manifest["files"])
        if manifest.get("algorithm") != "sha256" or not all(
            isinstance(e["bytes"], int) and isinstance(e["sha256"], str) and len(e["sha256"]) == 64
            for e in files.values()
        ):
            raise ValueError("entries are not {bytes, sha256}")
    except FileNotFoundError:
        raise UserError(
            f"the bundle has no manifest ({MANIFEST_FILE}), so it cannot be checked before loading",
            where=str(path),
            fix=_RESEAL,
        ) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(
            f"the bundle's manifest is unreadable ({err})", where=str(path), fix=_RESEAL
        ) from None
    return files


def check_listing(root: Path, listed: Mapping[str, dict]) -> None:
    """Refuse a file the manifest does not list, a listed file that is not there, and a size that differs."""
    present = bundle_files(root)
    for name in present:
        if name not in listed:
            raise UserError(
                f"{name!r} is in the bundle but not in its manifest (an extra file)",
                where=str(root / name),
                fix=f"remove it; {_RESEAL}",
            )
    for name, entry in listed.items():
        if name not in present:
            raise UserError(
                f"{name!r} is listed in the bundle's manifest but missing",
                where=str(root / name),
                fix=_RESEAL,
            )
        size = (root / name).stat().st_size
        if size != entry["bytes"]:
            raise UserError(
                f"{name!r} changed: expected {entry['bytes']} bytes, found {size}",
                where=str(root / name),
                fix=_RESEAL,
            )


def check_hashes(root: Path, listed: Mapping[str, dict]) -> None:
    """Refuse a file whose sha256 is not the manifest's (symlinks are not followed)."""
    for name, entry in listed.items():
        found = file_sha256(root / name, follow_symlinks=False)
        if found != entry["sha256"]:
            raise UserError(
                f"{name!r} changed: expected sha256 {entry['sha256'][:12]}…, found {found[:12]}…",
                where=str(root / name),
                fix=_RESEAL,
            )


def parse_meta(root: Path, listed: Mapping[str, dict]) -> dict:
    """bundle.json, parsed once its hash has matched; a UserError when it is absent or not a JSON object."""
    path = root / BUNDLE_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if BUNDLE_META in listed else "absent"
    except (OSError, ValueError) as err:
        meta = f"unreadable: {err}"
    if not isinstance(meta, dict):
        raise UserError(f"the bundle's {BUNDLE_META} is {meta}", where=str(path), fix=_RESEAL)
    return meta


def check_version(root: Path, meta: dict, listed: Mapping[str, dict], expected: str | None) -> None:
    """An ONNX bundle holds only its known files, and the version recomputed from the manifest is bundle.json's
    and `expected` (when given). Other formats have no content version: refused when a version is expected."""
    where = str(root / BUNDLE_META)
    if meta.get("format") != "onnx":
        if expected is not None:
            raise UserError(
                f"a {meta.get('format')!r} bundle has no content version to check against {expected!r}",
                where=where,
                fix="a registry version or the production pointer names an exported ONNX bundle "
                "(`dvc repro export promote`)",
            )
        return
    graphs = {meta.get("model_file", ONNX_FILE), *(meta.get("variants") or {}).values()}
    unknown = sorted((set(listed) - ONNX_BUNDLE_FILES) | (graphs - {ONNX_FILE, INT8_FILE}))
    if unknown:
        raise UserError(
            f"an ONNX bundle holds and names only {sorted(ONNX_BUNDLE_FILES)}, not {unknown}",
            where=where,
            fix=_RESEAL,
        )
    found = version_of({name: entry["sha256"] for name, entry in listed.items()})
    if meta.get("version") != found:
        raise UserError(
            f"bundle.json says version {meta.get('version')!r}, but its files are version {found!r}",
            where=where,
            fix=_RESEAL,
        )
    if expected is not None and expected != found:
        raise UserError(
            f"expected version {expected!r}, but the bundle's files are version {found!r}",
            where=str(root),
            fix="the folder or the pointer names another bundle: copy the right one in again "
            "(`dvc repro export promote`) or roll back (`intentops rollback`)",
        )

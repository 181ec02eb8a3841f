"""Fetch dataset files from a mirror, an fsspec URL or the canonical public URL, and verify their sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

from intentops.errors import UserError

log = logging.getLogger(__name__)

MIRROR_ENV = "INTENTOPS_DATA_MIRROR"


@dataclass(frozen=True)
class FileSpec:
    """One dataset file as configured under `data.files.<key>` (or `data.taxonomy`)."""

    key: str
    file: str | None = None
    url: str | None = None
    path: str | None = None
    sha256: str | None = None

    @classmethod
    def from_config(cls, key: str, node) -> FileSpec:
        node = dict(node)
        unknown = set(node) - {"file", "url", "path", "sha256"}
        if unknown:
            raise UserError(
                f"unknown field(s) {sorted(unknown)} in data file '{key}'",
                where=f"conf/data: files.{key}",
                fix="use only file, url, path and sha256",
            )
        if not (node.get("path") or node.get("file")):
            raise UserError(
                f"data file '{key}' has neither `path` nor `file`",
                where=f"conf/data: files.{key}",
                fix="set `path` to a local path or fsspec URL, or `file` (+ `url`) for a published dataset",
            )
        return cls(key=key, **node)


def resolve_location(spec: FileSpec, dataset: str, mirror: str | None) -> str:
    """Where to read `spec` from: an explicit path wins, then the mirror, then the public URL."""
    if spec.path:
        return spec.path
    if mirror:
        return f"{mirror.rstrip('/')}/{dataset}/{spec.file}"
    if not spec.url:
        raise UserError(
            f"no source for data file '{spec.key}' ({spec.file})",
            where=f"conf/data/{dataset}.yaml: files.{spec.key}",
            fix=f"set its `url`, or set {MIRROR_ENV} to a folder laid out as <dataset>/<file>",
        )
    return spec.url


def mirror_from(config_mirror: str | None) -> str | None:
    """The environment variable overrides `data.mirror` in config; empty means unset."""
    return os.environ.get(MIRROR_ENV) or config_mirror or None


def _fetch_http(url: str, timeout_s: float, retries: int) -> bytes:
    import requests

    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            resp = requests.get(url, timeout=timeout_s)
            if resp.status_code == 404:
                raise UserError(
                    f"the URL answered 404 Not Found ({url})",
                    where=url,
                    fix=f"check the url in conf/data, or set {MIRROR_ENV} to a local copy",
                )
            resp.raise_for_status()
            return resp.content
        except requests.RequestException as err:
            last = err
            log.warning("download attempt %d/%d failed for %s: %s", attempt, retries, url, err)
            if attempt < retries:
                time.sleep(min(2**attempt, 10))
    raise UserError(
        f"cannot download after {retries} attempts: {last}",
        where=url,
        fix=f"check your network or proxy, or set {MIRROR_ENV} to a local directory or fsspec URL holding the files",
    )


def fetch_bytes(location: str, timeout_s: float = 60, retries: int = 3) -> bytes:
    """Read a whole file from a local path, an http(s) URL or any fsspec URL."""
    if location.startswith(("http://", "https://")):
        return _fetch_http(location, timeout_s, retries)
    import fsspec

    try:
        with fsspec.open(location, "rb") as fh:
            return fh.read()
    except FileNotFoundError as err:
        raise UserError(
            "data file not found",
            where=location,
            fix=f"check the path; a mirror ({MIRROR_ENV}) must be laid out as <dataset>/<file>",
        ) from err
    except IsADirectoryError as err:
        raise UserError(
            "expected a file but found a directory", where=location, fix="point at the file itself"
        ) from err
    except (ImportError, ValueError) as err:  # unknown protocol or missing fsspec backend
        raise UserError(
            f"cannot open this URL: {err}", where=location, fix="install the fsspec backend for it"
        ) from err


def verify_sha256(data: bytes, expected: str | None, where: str, key: str) -> str:
    """Return the sha256 of `data`; raise if it is empty or differs from `expected`."""
    if not data:
        raise UserError("the file is empty (0 bytes)", where=where, fix="re-download or re-export the file")
    digest = hashlib.sha256(data).hexdigest()
    if expected and digest != expected.lower():
        raise UserError(
            f"sha256 mismatch for '{key}': expected {expected}, got {digest}",
            where=where,
            fix="the file is corrupt or a different version: fetch it again; if you changed it on purpose, "
            "update its sha256 in conf/data",
        )
    return digest


def fetch_verified(
    spec: FileSpec, dataset: str, mirror: str | None, timeout_s: float, retries: int
) -> tuple[bytes, str, str]:
    """Fetch one configured file and verify it.

    Returns:
        (content, sha256, location it came from)
    """
    location = resolve_location(spec, dataset, mirror)
    log.info("fetching %s <- %s", spec.key, location)
    data = fetch_bytes(location, timeout_s=timeout_s, retries=retries)
    return data, verify_sha256(data, spec.sha256, location, spec.key), location

"""The model registry, on local disk (`models/registry`) or at any fsspec URL (`s3://bucket/prefix` for clusters).

Layout under the registry's root:
    <version>/              a bundle (read by Predictor.load), sealed: it verifies as that version
    events/<seq>.json       one event per promotion, rollback or staged candidate, numbered 1, 2, 3 ...
    production              the production version, one line: what replicas poll

The guard is a conditional write. Moving production (or staging a candidate) means creating the next event,
`events/<seq+1>.json`, with create-only semantics: `If-None-Match: *` on S3, an exclusive hard link on local
disk. Of two promotions that read the same state, the second one's create fails and it raises
RegistryConflict instead of overwriting the first (no lost update). Each event is one whole object, written in
one request (S3) or one rename (disk), so the history cannot be torn; an event that does not parse is skipped
with a warning. The `production` file is written after its event, and re-written from the newest event if
another promotion overtook it, so it always ends at the newest event's version.

Replicas resolve `production`, download the bundle into a local cache and verify it there (`fetch`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from intentops.errors import UserError
from intentops.inference.bundle import read_model_card, verify_bundle

POINTER = "production"
EVENTS = "events"
# Registries written before the event log kept their history in one JSON-lines file; it is still read.
LEGACY_HISTORY = "history.jsonl"
REGISTRY_ENV = "INTENTOPS_REGISTRY_URL"
CACHE_ENV = "INTENTOPS_BUNDLE_CACHE"
DEFAULT_CACHE = "/tmp/intentops/bundles"
# Events that move production; `candidate` only stages a version.
PRODUCTION_EVENTS = ("promote", "rollback")
# Remote protocols whose create-only write (If-None-Match: *) is tested (tests/integration/test_registry.py):
# a backend that ignored it would let two promotions overwrite each other, so moves elsewhere are refused.
CONDITIONAL_PROTOCOLS = ("s3", "s3a")
# Cached bundles kept per replica (the newest by use); older ones are removed after a fetch.
CACHE_KEEP = 3

log = logging.getLogger(__name__)


class RegistryConflict(UserError):
    """Another promotion moved the registry after this one read it."""


def registry_url(configured: str | os.PathLike) -> str:
    """$INTENTOPS_REGISTRY_URL, else the configured registry (paths.registry_dir or serving.registry)."""
    return os.environ.get(REGISTRY_ENV) or os.fspath(configured)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@dataclass(frozen=True)
class State:
    """The registry as one read saw it: the newest event number, production, the staged candidate, all events."""

    seq: int
    production: str | None
    candidate: str | None
    events: list[dict]


class Storage:
    """The few operations the registry needs, on a local folder (pathlib, atomic renames) or an fsspec URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.remote = is_remote(url)
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
        else:
            self.fs, self.root = None, str(Path(url.removeprefix("file://")).resolve())

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def read_text(self, *parts: str) -> str | None:
        try:
            if self.remote:
                return self.fs.cat_file(self.path(*parts)).decode("utf-8")
            return Path(self.path(*parts)).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, text: str, *parts: str) -> None:
        """Replace a small object whole (one PUT, or a rename on disk)."""
        if self.remote:
            self.fs.pipe_file(self.path(*parts), text.encode("utf-8"))
            return
        dest = Path(self.path(*parts))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, dest)

    def create(self, text: str, *parts: str) -> bool:
        """Write a new object whole only if none exists there; False if one does (the conditional write)."""
        if self.remote:
            if self.url.split("://", 1)[0] not in CONDITIONAL_PROTOCOLS:
                raise UserError(
                    f"moving the registry needs a create-only write, which this project has tested only on local "
                    f"folders and {', '.join(p + '://' for p in CONDITIONAL_PROTOCOLS)}",
                    where=self.url,
                    fix="keep the registry on S3 (or an S3-compatible store) or a local folder; replicas can "
                    "still read it from any fsspec URL",
                )
            try:
                self.fs.pipe_file(self.path(*parts), text.encode("utf-8"), mode="create")
            except FileExistsError:
                return False
            return True
        dest = Path(self.path(*parts))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.link(tmp, dest)  # fails if `dest` exists: exclusive, and whole from the first moment
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def names(self, *parts: str) -> list[str]:
        """Names directly under a folder (fresh listing, no cache); [] when there is none."""
        if self.remote:
            try:
                entries = self.fs.ls(self.path(*parts), detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        folder = Path(self.path(*parts))
        return [p.name for p in folder.iterdir()] if folder.is_dir() else []

    def is_dir(self, *parts: str) -> bool:
        if self.remote:
            return bool(self.names(*parts))
        return Path(self.path(*parts)).is_dir()

    def upload(self, local: Path, *parts: str) -> None:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(file), self.path(*parts, *file.relative_to(local).parts))

    def download(self, dest: Path, *parts: str) -> None:
        src = self.path(*parts)
        self.fs.invalidate_cache()
        for remote in self.fs.find(src):
            target = dest / remote[len(src) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(target))


@dataclass(frozen=True)
class Registry:
    url: str

    @classmethod
    def at(cls, url: str | os.PathLike) -> Registry:
        return cls(os.fspath(url))

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.url)

    @property
    def root(self) -> Path:
        """The local folder of a registry on disk (a remote registry has none)."""
        if is_remote(self.url):
            raise UserError(
                f"{self.url} is not a local folder", where=self.url, fix="use fetch() for remote bundles"
            )
        return Path(self.storage.root)

    def _where(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    # --- reading ---------------------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        store = self.storage
        names = [
            n for n in store.names() if n not in (EVENTS, POINTER, LEGACY_HISTORY) and not n.startswith(".")
        ]
        return sorted(n for n in names if store.is_dir(n))

    def production(self) -> str | None:
        """The production version, from the pointer that replicas poll; None when nothing was promoted yet."""
        text = self.storage.read_text(POINTER)
        version = (text or "").strip()
        return version or self.state().production

    def history(self) -> list[dict]:
        return self.state().events

    def state(self) -> State:
        """One consistent read of the event log (legacy history.jsonl entries first, as event 0)."""
        store = self.storage
        events = self._legacy_events(store)
        seqs = sorted(int(n[:-5]) for n in store.names(EVENTS) if n.endswith(".json") and n[:-5].isdigit())
        for seq in seqs:
            event = _parse(store.read_text(EVENTS, _event_name(seq)), self._where(EVENTS, _event_name(seq)))
            if event is not None:
                events.append({**event, "seq": seq})
        production = next(
            (e["version"] for e in reversed(events) if e.get("event") in PRODUCTION_EVENTS), None
        )
        if production is None and not seqs:
            production = (store.read_text(POINTER) or "").strip() or None  # a pointer written by hand
        candidate = next((e["version"] for e in reversed(events) if e.get("event") == "candidate"), None)
        if candidate == production:
            candidate = None
        return State(seqs[-1] if seqs else 0, production, candidate, events)

    def _legacy_events(self, store: Storage) -> list[dict]:
        text = store.read_text(LEGACY_HISTORY) or ""
        events = [_parse(line, self._where(LEGACY_HISTORY)) for line in text.splitlines() if line.strip()]
        return [{**e, "seq": 0} for e in events if e is not None]

    # --- writing ---------------------------------------------------------------------------------------------
    def add(self, bundle_dir: str | os.PathLike, version: str) -> Path | str:
        """Upload a bundle as `version`, verified (content hash = version) before, and after in the registry.

        Returns where it is: the local folder, or the URL of a remote registry's copy.

        Idempotent: an existing copy that verifies is kept; one that does not is replaced. A bundle that does
        not verify is refused (UserError) and the registry's copy is not trusted until it verifies.
        """
        bundle_dir = Path(bundle_dir)
        verify_bundle(bundle_dir, expected_version=version)
        store = self.storage
        if not store.remote:
            return self._add_local(bundle_dir, version)
        if store.is_dir(version):
            try:
                self._verify_remote(version)
                return self._where(version)
            except UserError as err:
                log.warning("registry version %s does not verify, uploading it again: %s", version, err.what)
                store.fs.rm(store.path(version), recursive=True)
        store.upload(bundle_dir, version)
        self._verify_remote(version)
        return self._where(version)

    def _add_local(self, bundle_dir: Path, version: str) -> Path:
        from intentops.io import atomic_path

        dest = self.root / version
        if dest.is_dir():
            try:
                verify_bundle(dest, expected_version=version)
                return dest
            except UserError as err:
                log.warning("registry version %s does not verify, replacing it: %s", version, err.what)
        with atomic_path(dest) as tmp:
            shutil.copytree(bundle_dir, tmp)
            verify_bundle(tmp, expected_version=version)  # raising here leaves `dest` as it was
        return dest

    def _verify_remote(self, version: str) -> None:
        with tempfile.TemporaryDirectory(prefix="intentops-verify-") as tmp:
            self.storage.download(Path(tmp) / version, version)
            verify_bundle(Path(tmp) / version, expected_version=version)

    def _require(self, version: str) -> None:
        """Raise a UserError unless `version` has a folder in the registry (one listing; more only to say which do)."""
        if not self.storage.is_dir(version):
            raise UserError(
                f"version {version!r} is not in the registry",
                where=self._where(version),
                fix=f"stage it (`intentops registry stage <bundle>`), restore its folder, or choose one of "
                f"{self.versions()} (`intentops registry list`; `intentops rollback --to`)",
            )

    def record(self, event: str, version: str, reason: str, after: int | None = None, **extra: Any) -> dict:
        """Append an event with the conditional write; `after` is the event number the caller decided on.

        Raises RegistryConflict when another event was recorded after `after` (or, with `after=None`, between
        this call's read and its write).
        """
        state = self.state()
        base = state.seq if after is None else after
        self._require(version)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "version": version,
            "previous": state.production,
            "reason": reason,
            **extra,
        }
        if state.seq != base or not self.storage.create(
            json.dumps(entry) + "\n", EVENTS, _event_name(base + 1)
        ):
            raise RegistryConflict(
                f"the registry changed while this {event} was being decided: event {base + 1} already exists",
                where=self._where(EVENTS, _event_name(base + 1)),
                fix="another promotion or rollback won the race; check `intentops registry list` and run "
                "this one again if it still applies",
            )
        if event in PRODUCTION_EVENTS:
            self._write_pointer(version)
        return {**entry, "seq": base + 1}

    def _write_pointer(self, version: str) -> None:
        """Write the pointer, then re-write it from the newest event if another promotion overtook this one."""
        store = self.storage
        store.write_text(version + "\n", POINTER)
        newest = self.state().production
        if newest and newest != version:
            store.write_text(newest + "\n", POINTER)

    def set_production(
        self, version: str, event: str, reason: str, after: int | None = None, **extra
    ) -> dict:
        """Point production at `version` (an event `promote` or `rollback`)."""
        return self.record(event, version, reason, after=after, **extra)

    def stage(self, bundle_dir: str | os.PathLike, version: str, reason: str, **extra: Any) -> dict:
        """Upload a verified bundle and record it as the candidate; production does not move."""
        self.add(bundle_dir, version)
        for attempt in range(3):  # staging does not depend on the state it read: retry a lost race
            try:
                return self.record("candidate", version, reason, **extra)
            except RegistryConflict:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def promote(self, version: str | None = None, reason: str = "promoted by hand") -> dict:
        """Move production to `version`, by default the staged candidate."""
        state = self.state()
        version = version or state.candidate
        if not version:
            raise UserError(
                "no candidate to promote",
                where=self.url,
                fix="stage one (`intentops registry stage <bundle>`, or the promote stage in CI) or name a version",
            )
        return self.set_production(version, "promote", reason, after=state.seq)

    def rollback(self, to: str | None = None) -> str:
        """Point production back at `to`, or at the version production had before the current one."""
        state = self.state()
        current = state.production
        if current is None:
            raise UserError(
                "nothing to roll back: no production model yet",
                where=self._where(POINTER),
                fix="run the pipeline (`make run`) so that `promote` sets a first production model",
            )
        if to is None:
            earlier = [
                e["version"]
                for e in state.events
                if e.get("event") in PRODUCTION_EVENTS and e["version"] != current
            ]
            if not earlier:
                raise UserError(
                    "no earlier production version to roll back to",
                    where=self._where(EVENTS),
                    fix="name a version with --to",
                )
            to = earlier[-1]
        self.set_production(to, "rollback", f"rollback from {current}", after=state.seq)
        return to

    # --- replicas --------------------------------------------------------------------------------------------
    def fetch(self, version: str, cache: str | os.PathLike | None = None) -> Path:
        """A local folder holding `version`: the registry's own on disk, else a verified copy in `cache`.

        A cached copy that no longer verifies is downloaded again. The caller verifies before loading too
        (serving's check_bundle), so a bad copy is never loaded either way.
        """
        if not is_remote(self.url):
            self._require(version)
            return self.root / version
        cache = Path(cache or default_cache())
        dest = cache / version
        if dest.is_dir():
            try:
                verify_bundle(dest, expected_version=version)
                os.utime(dest)
                return dest
            except UserError as err:
                log.warning("cached bundle %s does not verify, downloading it again: %s", dest, err.what)
        self._require(version)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=cache))
        try:
            self.storage.download(tmp / version, version)
            verify_bundle(tmp / version, expected_version=version)
            shutil.rmtree(dest, ignore_errors=True)  # a copy that did not verify
            try:
                os.replace(tmp / version, dest)
            except OSError:  # another replica on this node put its copy there first: use it if it verifies
                verify_bundle(dest, expected_version=version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(cache, keep=CACHE_KEEP)
        return dest

    def model_card(self, version: str, cache: str | os.PathLike | None = None) -> str:
        """The model card (model_card.md) of a registered version, read from a copy that verifies as it."""
        folder = self.fetch(version, cache)
        if not is_remote(self.url):  # fetch verified a remote copy; the registry's own folder is checked here
            verify_bundle(folder, expected_version=version)
        return read_model_card(folder)


def _event_name(seq: int) -> str:
    return f"{seq:08d}.json"


def _parse(text: str | None, where: str) -> dict | None:
    """An event, or None (with a warning) when it is missing or not a whole JSON object with a version."""
    try:
        event = json.loads(text or "")
    except json.JSONDecodeError:
        log.warning("skipping an unreadable registry event in %s: %r", where, (text or "")[:80])
        return None
    if not isinstance(event, dict) or not isinstance(event.get("version"), str):
        log.warning("skipping a registry event without a version in %s", where)
        return None
    return event


def _prune(cache: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used bundles from the cache."""
    folders = sorted(
        (p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)

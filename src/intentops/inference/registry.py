"""The model registry: versioned bundles under models/registry/<version>/, a `production` pointer, a history.

Layout:
    models/registry/<version>/      a bundle (read by Predictor.load), sealed: it verifies as that version
    models/registry/production      the production version, one line (git-tracked; deploys watch it)
    models/registry/history.jsonl   one JSON event per promotion or rollback, oldest first
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from intentops.errors import UserError
from intentops.inference.bundle import verify_bundle
from intentops.io import atomic_path

POINTER = "production"
HISTORY = "history.jsonl"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registry:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> Registry:
        return cls(Path(root))

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def production(self) -> str | None:
        """The production version, or None when nothing was promoted yet."""
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return version or None

    def production_dir(self) -> Path | None:
        version = self.production()
        return self.root / version if version else None

    def history(self) -> list[dict]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def add(self, bundle_dir: str | os.PathLike, version: str) -> Path:
        """Copy a bundle in as `version`, checked against its manifest and that version before and after the copy.

        Idempotent: an existing copy that verifies is kept; one that does not (an older export without a
        manifest, a damaged copy) is replaced in one rename. A bundle that does not verify is refused (UserError).
        """
        verify_bundle(bundle_dir, expected_version=version)
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

    def set_production(self, version: str, event: str, reason: str, **extra) -> None:
        """Point production at `version` and append the event to the history."""
        if version not in self.versions():
            raise UserError(
                f"version {version!r} is not in the registry",
                where=str(self.root),
                fix=f"choose one of {self.versions()} (see `intentops registry list`)",
            )
        previous = self.production()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / POINTER) as tmp:
            tmp.write_text(version + "\n")
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "version": version,
            "previous": previous,
            "reason": reason,
            **extra,
        }
        with open(self.root / HISTORY, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def rollback(self, to: str | None = None) -> str:
        """Point production back at `to`, or at the version production had before the current one."""
        current = self.production()
        if current is None:
            raise UserError(
                "nothing to roll back: no production model yet",
                where=str(self.root / POINTER),
                fix="run the pipeline (`make run`) so that `promote` sets a first production model",
            )
        if to is None:
            earlier = [e["version"] for e in self.history() if e["version"] != current]
            if not earlier:
                raise UserError(
                    "no earlier production version to roll back to",
                    where=str(self.root / HISTORY),
                    fix="name a version with --to",
                )
            to = earlier[-1]
        self.set_production(to, event="rollback", reason=f"rollback from {current}")
        return to

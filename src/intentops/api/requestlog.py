"""The replica's request log: one JSON line per request (never the text), buffered and written in blocks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SERVE_LOGGER = "ray.serve"


class RequestLog:
    """One JSON line per request, buffered and written with one write() per flush; rotated by size.

    Ray's logger formats, stats and flushes the file for every line; here `add` only encodes the line.
    The replica flushes when no request is in flight, when `max_lines` are pending, on a timer and on
    shutdown, so a quiet API writes each line at once and a busy one writes them in blocks.

    Args:
        path: the log file (appended to).
        max_bytes: rotate past this size (path -> path.1 -> ... -> path.<backup_count>); 0: never.
        backup_count: rotated files kept.
        max_lines: flush when this many lines are pending.
    """

    def __init__(
        self, path: str | os.PathLike, max_bytes: int = 0, backup_count: int = 0, max_lines: int = 64
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backup_count, self.max_lines = max_bytes, backup_count, max_lines
        self._lines: list[bytes] = []
        self._file = open(self.path, "ab")  # noqa: SIM115 -- held open for the replica's life

    def add(self, record: Mapping[str, Any]) -> None:
        import orjson

        self._lines.append(orjson.dumps(record, default=str) + b"\n")
        if len(self._lines) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data, self._lines = b"".join(self._lines), []
        self._file.write(data)
        self._file.flush()
        if self.max_bytes and self._file.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        if self.backup_count:
            for i in range(self.backup_count - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._file = open(self.path, "ab")  # noqa: SIM115
        else:
            self._file = open(self.path, "wb")  # noqa: SIM115 -- no backups: start the file over

    def close(self) -> None:
        self.flush()
        self._file.close()


class LoggerLines:
    """The request lines as records of the `ray.serve` logger: Serve's JSON log when no log file is found."""

    def __init__(self) -> None:
        self._log = logging.getLogger(SERVE_LOGGER)

    def add(self, record: Mapping[str, Any]) -> None:
        extra = {k: v for k, v in record.items() if k not in ("timestamp", "levelname", "message")}
        self._log.info(record["message"], extra={"ray_serve_extra_fields": extra})

    def flush(self) -> None:
        """Serve's handlers write (or buffer, RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE) each line themselves."""


def serve_log_file() -> logging.FileHandler | None:
    """The file handler of this replica's Serve log (Serve puts a MemoryHandler in front of it), or None."""
    for handler in logging.getLogger(SERVE_LOGGER).handlers:
        target = getattr(handler, "target", handler)
        if isinstance(target, logging.FileHandler):
            return target
    return None


def replica_fields() -> dict[str, str]:
    """application, deployment and replica of this process (what Serve's JSON log lines carry)."""
    from ray import serve

    ctx = serve.get_replica_context()
    return {
        "application": ctx.app_name,
        "deployment": ctx.deployment,
        "replica": ctx.replica_tag,
        "component_name": "replica",
    }


def open_request_log() -> RequestLog | LoggerLines:
    """The request log beside this replica's Serve log (`<name>.requests.log`), rotated as that log is.

    Serve writes the replica's log to logs/serve/replica_<app>_<deployment>_<replica>.log in the Ray session
    (or LoggingConfig.logs_dir), rotated by RAY_ROTATION_MAX_BYTES / RAY_ROTATION_BACKUP_COUNT.
    """
    handler = serve_log_file()
    if handler is None:
        return LoggerLines()
    path = Path(handler.baseFilename)
    return RequestLog(
        path.with_name(f"{path.stem}.requests.log"),
        max_bytes=getattr(handler, "maxBytes", 0) or 0,
        backup_count=getattr(handler, "backupCount", 0) or 0,
    )


class ReplicaRequestLog:
    """This replica's request log, opened on the first line: the replica's context exists only from then on."""

    def __init__(self) -> None:
        self._log: RequestLog | LoggerLines | None = None
        self._fields: dict[str, str] = {}

    def add(self, message: str, request_id: str, info: Mapping[str, Any]) -> None:
        """Encode one request's line: when, what, the request id, this replica, then `info` (status, route, ...)."""
        if self._log is None:
            self._fields = replica_fields()
            self._log = open_request_log()
        self._log.add(
            {
                "timestamp": time.time(),
                "levelname": "INFO",
                "message": message,
                "request_id": request_id,
                **self._fields,
                **info,
            }
        )

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

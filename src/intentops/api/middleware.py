"""Auth, request metrics and the request log line: one pure ASGI middleware (no per-request task overhead)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from intentops.api.requestlog import ReplicaRequestLog
from intentops.config import API_KEY_ENV

# Routes a load balancer or orchestrator probes without credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The metric tag values of `route`: a fixed set, so random paths cannot grow the metrics (anything else: other).
ROUTES = frozenset(
    {"/v1/predict", "/v1/feedback", "/v1/model", "/v1/model/card", "/docs", "/openapi.json", *OPEN_PATHS}
)
REQUEST_ID_HEADER = b"x-request-id"


# `name=key`: a client's name, then its key; the name is what its /v1/feedback votes are recorded under.
_CLIENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
# The client of a request when no key is checked (serving.auth off, or no key set).
ANONYMOUS = "anonymous"


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """(client name, key) per comma-separated entry of $INTENTOPS_API_KEY.

    An entry is `name=key` (name: a letter, then letters, digits, `_.-`) or a plain key, whose client name is
    `key-` + the first 8 hex digits of its sha256 (the key itself is never recorded). A plain key with `=` in it
    (base64 padding) stays a plain key: only a valid name before the first `=` and a key that is not all `=`
    make a named entry. Several entries may share a name (a rotation).
    """
    keys = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, key = entry.partition("=")
        if sep and _CLIENT_NAME.fullmatch(name) and key.strip("="):
            keys.append((name, key.encode()))
            keys.append((name, entry.encode()))  # the whole entry works too: tools that send it as is
        else:
            keys.append((f"key-{hashlib.sha256(entry.encode()).hexdigest()[:8]}", entry.encode()))
    return keys


def api_client(headers: Sequence[tuple[bytes, bytes]], keys: Sequence[tuple[str, bytes]]) -> str | None:
    """The client name of the key the ASGI headers carry (X-API-Key or `Authorization: Bearer <key>`), or None."""
    found = None
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            value = value[7:].strip()
        elif name != b"x-api-key":
            continue
        # compare_digest against every key, so timing says nothing about which one matched
        for client, key in keys:
            if hmac.compare_digest(value, key):
                found = client
    return found


def api_key_ok(headers: Sequence[tuple[bytes, bytes]], keys: str) -> bool:
    """True when the ASGI headers carry one of `keys` (see parse_keys) as X-API-Key or `Authorization: Bearer <key>`.

    `keys` is comma-separated, so a rotation can accept the old and the new key for a while.
    """
    return api_client(headers, parse_keys(keys)) is not None


def request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Serve's id of this request: the X-Request-ID header its proxy passes on (the client's, or one it made).

    Serve returns the same id in the response's X-Request-ID header and in its own log lines.
    """
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            return value.decode()
    return str(uuid.uuid4())  # not through Serve's HTTP proxy


def app_path(scope: dict) -> str:
    """The request path inside the app: without the application's route prefix (ASGI root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


class Policy:
    """What the middleware enforces, set on every reconfigure: the largest body a replica reads
    (serving.max_body_bytes) and the API keys (serving.auth; None: no key checked)."""

    max_bytes: int = 1_000_000
    api_keys: str | None = None
    keys: list[tuple[str, bytes]] = []  # parsed api_keys: (client name, key)

    def configure(self, max_bytes: int, auth: str) -> None:
        self.max_bytes = max_bytes
        self.api_keys = None if auth == "off" else os.environ.get(API_KEY_ENV) or None
        self.keys = parse_keys(self.api_keys or "")


def too_large(limit: int, where: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": f"request body over {limit} bytes",
            "where": where,
            "fix": "send fewer or shorter texts per request (serving.max_body_bytes, max_texts)",
        },
        status_code=413,
    )


def content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header as a number (None when absent; -1 when it is not a number)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else -1
    return None


async def read_capped(receive: Any, limit: int) -> list[dict] | None:
    """The body messages of a request without Content-Length, read up to `limit` bytes; None past it."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if message["type"] != "http.request" or not message.get("more_body"):
            return messages


def replay(messages: list[dict], receive: Any) -> Any:
    """An ASGI `receive` that returns the messages read already, then the real ones."""
    queued = list(messages)

    async def again() -> dict:
        return queued.pop(0) if queued else await receive()

    return again


UNAUTHORIZED = {
    "error": "missing or wrong API key",
    "where": "X-API-Key or Authorization header",
    "fix": "send the key as `X-API-Key: <key>` or `Authorization: Bearer <key>`",
}


class Guard:
    """401 without the API key (when $INTENTOPS_API_KEY is set and serving.auth is not off; OPEN_PATHS excepted), then one JSON log line.

    The route finds `scope["intentops"]` (status, request_id, client: the name of the API key's client, or
    `anonymous` when no key is checked) and adds what the log line should say about the model call.

    Args:
        asgi_app: the app inside.
        request_log: the replica's request log.
    """

    def __init__(self, asgi_app: Any, request_log: ReplicaRequestLog, policy: Policy):
        from ray.serve.metrics import Counter, Histogram

        self.app = asgi_app
        self.log = request_log
        self.policy = policy
        self.in_flight = 0  # requests inside this replica: the request log is flushed when none is left
        self.latency = Histogram(
            "intentops_request_latency_ms",
            description="Request latency in the replica (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route",),
        )
        self.errors = Counter(
            "intentops_request_errors",
            description="Responses with status >= 400.",
            tag_keys=("route", "status"),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = app_path(scope)
        info: dict[str, Any] = {"status": 500, "request_id": request_id(scope["headers"])}
        scope["intentops"] = info

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        self.in_flight += 1
        try:
            keys = self.policy.keys
            info["client"] = api_client(scope["headers"], keys) if keys else ANONYMOUS
            if keys and path not in OPEN_PATHS and info["client"] is None:
                await JSONResponse(UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send_status
                )
            else:
                await self._within_limit(scope, receive, send_status)
        finally:
            self.in_flight -= 1
            self._observe(scope, path, info, (time.perf_counter() - start) * 1000)

    async def _within_limit(self, scope: dict, receive: Any, send: Any) -> None:
        """413 for a body over the limit, decided before it is parsed: on Content-Length, else while reading."""
        limit = self.policy.max_bytes
        length = content_length(scope["headers"])
        if length is not None and length > limit:
            return await too_large(limit, f"Content-Length: {length}")(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            messages = await read_capped(receive, limit)
            if messages is None:
                return await too_large(limit, "request body (chunked)")(scope, receive, send)
            receive = replay(messages, receive)
        await self.app(scope, receive, send)

    def _observe(self, scope: dict, path: str, info: dict, ms: float) -> None:
        route = path if path in ROUTES else "other"
        status = info["status"]
        self.latency.observe(ms, tags={"route": route})
        if status >= 400:
            self.errors.inc(tags={"route": route, "status": str(status)})
        if path in OPEN_PATHS:
            return  # probes every few seconds would drown the log
        info["method"], info["path"], info["latency_ms"] = scope["method"], route, round(ms, 2)
        # Our own JSON-lines file, not Ray's logger (which formats, stats and flushes the file per line):
        # encoded here, written in one block when no request is left in flight or 64 lines are pending.
        self.log.add(f"{scope['method']} {route} {status} {ms:.1f}ms", info["request_id"], info)
        if not self.in_flight:
            self.log.flush()

"""Fault harness for the intent API (tracker issue 14) on loopback; prints ONE JSON line.

    python benchmarks/serve_faults.py [--bundle production|DIR] [--scale 1.0] [--only fault,...]

Starts everything itself (a local Ray with 2 CPUs, Serve on a free 127.0.0.1 port, IntentService over the
bundle with a SQLite store in a temp dir; for `postgres` a throwaway PostgreSQL server and a second app at
/pg whose replica gets $INTENTOPS_DB_URL) and stops it. The faults, in their full forms (--scale multiplies
every duration and request count; client counts and the body size stay):

  hostile       38 hostile bodies (lone surrogate, NUL, a control char; single texts and lists) in 8 s
                beside 16 clients sending good single texts
  hangup        30-text lists whose clients give up after 10 ms, for 10 s (8 such clients, each pausing
                50 ms between requests), beside 8 good clients
  sqlite_lock   `BEGIN EXCLUSIVE` on the store's SQLite file for 40 s (a long `intentops label`)
  postgres      the /pg app's PostgreSQL stopped (`pg_ctl stop -m fast`) for 40 s, then started
  big_body      one 40 MB body beside 4 good clients
  random_paths  3,000 then 30,000 (in all) GETs of random /v1/<name> paths without a key
  overload      500 clients sending single texts back to back for 10 s

Per fault: good_sent, good_failed (anything but 200, client time-outs included), good_p99_ms (of the 200s)
and `recovered`: afterwards a normal request answers 200 within 2 s AND /readyz answers 200, and both again
1 s later. Each fault starts from a healthy app: `healthy_before_after_s` says how long the app took to
answer normally before it (the previous fault's after-effects); null: it never did in 30 s, so it was
redeployed.
The DB faults add p99_before_ms (the same clients just before), p99_during_ms (both over every request,
failed ones included with their time: a request stuck until Serve's 408 counts), what /readyz said during the
fault, and ids_lost: prediction ids returned in the run that are not in the store's `predictions` table
30 s after the fault ends (polled). big_body and random_paths add the replica's VmRSS (MB, /proc) and
random_paths the distinct `route` tag values of intentops_request_latency_ms; overload adds status counts,
p99 of all answers and a sample body per status (its clients' requests are the good ones there, and as
Serve's 503 and 408 are the expected answers to overload, its good_failed counts only other statuses).
`musts` checks the issue's acceptance criteria (memory "flat": under 10 MB more after 30,000 paths than
after 3,000).

Serve's own answers under overload (read in ray 2.60: serve/_private/http_util.py get_http_response_status
and send_http_response_on_exception, serve/_private/router.py, serve/exceptions.py BackPressureError), sent
by the HTTP proxy, never by our app, as text/plain, and only if the response has not started:
  503  "Request dropped due to backpressure (num_queued_requests=N, max_queued_requests=M)." when the
       proxy already holds the deployment's max_queued_requests (429 instead, and a Retry-After header,
       only with a backpressure_config); also 503 when the deployment is unavailable.
  408  "Request <request id> timed out after <T>s." when http_options.request_timeout_s passes (counted
       from when the proxy takes the request up, queueing for a replica included, so a client whose
       request waited in a busy proxy's backlog sees more than T; the `x-request-timeout-seconds` header
       overrides T per request); the proxy then cancels the request in the replica.
  A client that disconnects gets nothing; the proxy logs 499 and cancels the request in the replica.
request_timeout_s, max_queued_requests and max_ongoing_requests come from serving/config.yaml when it sets
them, else 5 s, 64 and 64.

Metrics: the replica's ray.serve.metrics go to the node's metrics agent, which serves Prometheus text at
http://127.0.0.1:<ray.nodes()[i]["MetricsExportPort"]>/metrics (also with include_dashboard=False), names
prefixed `ray_` (counters end in `_total`), with the tags application, deployment, replica and ours. The
agent exports what the replicas reported some seconds earlier, so counts are polled until they include
every request sent. It keeps at most 2,000 tag sets per metric (OpenTelemetry's cardinality limit); the
rest go to one series tagged otel_metric_overflow="true" and no application, counted as `overflowed`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from serve_load import TEXTS, percentile

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("INTENTOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))
# The `route` tag values the contract allows for the request metrics.
FIXED_ROUTES = frozenset(
    {"/v1/predict", "/v1/feedback", "/v1/model", "/healthz", "/readyz", "/docs", "/openapi.json", "other"}
)
LATENCY_METRIC = "intentops_request_latency_ms"
ERRORS_METRIC = "intentops_request_errors"
# Valid JSON that decodes to texts no model should see; `index` is the text the 422 should name.
HOSTILE = [
    (b'{"text": "card \\ud800 lost"}', 0),
    (b'{"text": "card \\u0000 lost"}', 0),
    (b'{"texts": ["my card is lost", "card \\udfff lost"]}', 1),
    (b'{"texts": ["top up failed", "pin \\u0007 blocked", "hello"]}', 1),
]
FAULTS = ("hostile", "hangup", "sqlite_lock", "postgres", "big_body", "random_paths", "overload")


def log(msg: str) -> None:
    print(f"[serve_faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def p99(values: list[float]) -> float | None:
    return round(percentile(values, 99), 1) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- HTTP --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """How to reach one app: base URL (with its route prefix), its Serve application name, its API key."""

    base: str
    app: str
    key: str | None = None

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key} if self.key else {}


def session() -> aiohttp.ClientSession:
    """A client session with no connection limit (each client coroutine keeps its own connection)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def call(
    s: aiohttp.ClientSession, method: str, url: str, timeout_s: float, **kwargs: Any
) -> tuple[int, bytes, float]:
    """(status, body, ms) of one request; status 0 and the exception's name when no answer came."""
    t = time.perf_counter()
    try:
        async with s.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs) as r:
            body = await r.read()
            status = r.status
    except (aiohttp.ClientError, TimeoutError) as err:
        status, body = 0, type(err).__name__.encode()
    return status, body, (time.perf_counter() - t) * 1000


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- good traffic ------------------------------------------------------------------------------------------
@dataclass
class Traffic:
    """Outcomes of the good requests; a fault that has a window (start, end: monotonic s) sets it."""

    results: list[tuple[float, float, int]] = field(
        default_factory=list, repr=False
    )  # sent, answered, status
    ids: list[str] = field(default_factory=list, repr=False)  # prediction ids returned
    window: list[float] = field(default_factory=lambda: [float("-inf"), float("inf")])

    def phase(self, sent: float, answered: float) -> str:
        """before: answered before the window; after: sent after it; during: in flight at some time in it."""
        start, end = self.window
        return "before" if answered < start else "after" if sent > end else "during"

    def summary(self, phases: tuple[str, ...] | None = None) -> dict[str, Any]:
        rows = [r for r in self.results if phases is None or self.phase(r[0], r[1]) in phases]
        ok = [(answered - sent) * 1000 for sent, answered, status in rows if status == 200]
        return {
            "good_sent": len(rows),
            "good_failed": len(rows) - len(ok),
            "good_p99_ms": p99(ok),
            "good_statuses": {str(k): v for k, v in Counter(r[2] for r in rows if r[2] != 200).items()},
        }

    def p99_ms(self, phase: str) -> float | None:
        """p99 latency of every request in `phase`, failed ones included (a 408 counts with its wait)."""
        return p99([(b - a) * 1000 for a, b, _ in self.results if self.phase(a, b) == phase])


async def predict_good(
    s: aiohttp.ClientSession, target: Target, i: int, timeout_s: float
) -> tuple[int, bytes, float]:
    """POST the i-th good text (TEXTS, cycled) with the key: (status, body, ms), as `call` answers."""
    return await call(
        s,
        "POST",
        target.url("/v1/predict"),
        timeout_s,
        json={"text": TEXTS[i % len(TEXTS)]},
        headers=target.headers,
    )


async def good_client(
    s: aiohttp.ClientSession,
    target: Target,
    traffic: Traffic,
    stop: asyncio.Event,
    pause_s: float,
    timeout_s: float,
) -> None:
    """Send good single texts until `stop`, one at a time, `pause_s` apart."""
    i = secrets.randbelow(len(TEXTS))
    while not stop.is_set():
        i, sent = i + 1, time.monotonic()
        status, body, _ = await predict_good(s, target, i, timeout_s)
        traffic.results.append((sent, time.monotonic(), status))
        if status == 200:
            traffic.ids.extend(p["prediction_id"] for p in json.loads(body)["predictions"])
        if pause_s:
            await asyncio.sleep(pause_s)


async def recovered(
    s: aiohttp.ClientSession, target: Target, within_s: float = 2.0, again_s: float = 1.0
) -> bool:
    """A normal request answers 200 within `within_s`, and so does /readyz; both again `again_s` later (a
    replica that stalls a moment after the fault has not recovered)."""
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(again_s)
        status, _, _ = await call(
            s, "POST", target.url("/v1/predict"), within_s, json={"text": TEXTS[0]}, headers=target.headers
        )
        ready, _, _ = await call(s, "GET", target.url("/readyz"), within_s, headers=target.headers)
        if (status, ready) != (200, 200):
            return False
    return True


async def with_good_traffic(
    target: Target,
    fault: Callable[[aiohttp.ClientSession, Traffic], Awaitable[dict]],
    clients: int,
    pause_s: float = 0.0,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Run `fault` while `clients` send good texts; its result with the good requests' summary and `recovered`."""
    traffic, stop = Traffic(), asyncio.Event()
    async with session() as s:
        tasks = [
            asyncio.create_task(good_client(s, target, traffic, stop, pause_s, timeout_s))
            for _ in range(clients)
        ]
        try:
            result = await fault(s, traffic)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        ok = await recovered(s, target)
    return {**traffic.summary(), "recovered": ok, **result, "_traffic": traffic}


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A fault's result without its private (underscored) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


# --- faults ------------------------------------------------------------------------------------------------
async def fault_hostile(
    target: Target, count: int = 38, seconds: float = 8.0, good_clients: int = 16
) -> dict[str, Any]:
    """`count` hostile bodies spread over `seconds` beside good clients; their statuses and named indexes."""
    answers: list[tuple[int, bytes, int]] = []

    async def one(s: aiohttp.ClientSession, body: bytes, index: int) -> None:
        status, reply, _ = await call(
            s,
            "POST",
            target.url("/v1/predict"),
            30,
            data=body,
            headers={**target.headers, "content-type": "application/json"},
        )
        answers.append((status, reply, index))

    async def fault(s: aiohttp.ClientSession, traffic: Traffic) -> dict:
        sends = []
        for i in range(count):
            sends.append(asyncio.create_task(one(s, *HOSTILE[i % len(HOSTILE)])))
            await asyncio.sleep(seconds / count)
        await asyncio.gather(*sends)
        return {}

    result = await with_good_traffic(target, fault, good_clients)
    named = sum(status == 422 and names_index(reply, index) for status, reply, index in answers)
    return {
        **result,
        "hostile_sent": len(answers),
        "hostile_statuses": {str(k): v for k, v in Counter(a[0] for a in answers).items()},
        "hostile_422_naming_index": named,
        "hostile_sample": next((a[1][:300].decode(errors="replace") for a in answers), None),
    }


def names_index(reply: bytes, index: int) -> bool:
    """The 422 body has error, where, fix and a problem naming text `index`."""
    body = json_or_none(reply)
    if not isinstance(body, dict) or not all(body.get(k) for k in ("error", "where", "fix")):
        return False
    return any(isinstance(p, dict) and p.get("index") == index for p in body.get("problems") or [])


async def fault_hangup(
    target: Target,
    seconds: float = 10.0,
    clients: int = 8,
    texts_per_request: int = 30,
    give_up_s: float = 0.01,
    pause_s: float = 0.05,
    good_clients: int = 8,
) -> dict[str, Any]:
    """`clients` send `texts_per_request`-text lists and hang up after `give_up_s`, for `seconds`.

    Each waits `pause_s` before its next request: a client that gives up after 10 ms without pausing sends
    regardless of what the server keeps up with, and the backlog of abandoned requests in Serve's proxy
    (seconds of it on 2 cores) would measure the overload fault again instead of the cost of a hang-up.
    """
    outcomes: Counter = Counter()
    body = {"texts": [TEXTS[i % len(TEXTS)] for i in range(texts_per_request)]}

    async def hanger(s: aiohttp.ClientSession, deadline: float) -> None:
        while time.monotonic() < deadline:
            status, _, _ = await call(
                s, "POST", target.url("/v1/predict"), give_up_s, json=body, headers=target.headers
            )
            outcomes["gave_up" if status == 0 else f"answered_{status}"] += 1
            await asyncio.sleep(pause_s)

    async def fault(s: aiohttp.ClientSession, traffic: Traffic) -> dict:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(hanger(s, deadline) for _ in range(clients)))
        return {"hangups": dict(outcomes), "hangups_per_s": round(sum(outcomes.values()) / seconds, 1)}

    return await with_good_traffic(target, fault, good_clients, timeout_s=10.0)


@contextlib.asynccontextmanager
async def sqlite_locked(db: Path) -> AsyncIterator[None]:
    """Hold `BEGIN EXCLUSIVE` on the SQLite file (as a long `intentops label` transaction would)."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(conn.execute, "BEGIN EXCLUSIVE")
        yield
    finally:
        if conn.in_transaction:
            await asyncio.to_thread(conn.execute, "ROLLBACK")
        conn.close()


async def fault_sqlite_lock(target: Target, db: Path, lock_s: float = 40.0, **kwargs: Any) -> dict[str, Any]:
    """The store's SQLite file locked for `lock_s` (see store_outage for the other arguments)."""
    return await store_outage(target, lambda: sqlite_locked(db), f"sqlite:///{db}", lock_s, **kwargs)


async def fault_postgres(target: Target, pg: Postgres, down_s: float = 40.0, **kwargs: Any) -> dict[str, Any]:
    """The app's PostgreSQL stopped for `down_s`, then started (see store_outage for the other arguments)."""

    @contextlib.asynccontextmanager
    async def down() -> AsyncIterator[None]:
        await asyncio.to_thread(pg.stop, "fast")
        try:
            yield
        finally:
            await asyncio.to_thread(pg.start)

    return await store_outage(target, down, pg.url, down_s, **kwargs)


async def store_outage(
    target: Target,
    outage: Callable[[], contextlib.AbstractAsyncContextManager],
    store_url: str,
    hold_s: float,
    before_s: float = 5.0,
    good_clients: int = 8,
    pause_s: float = 0.02,
    ids_wait_s: float = 30.0,
) -> dict[str, Any]:
    """Good traffic for `before_s`, then for `hold_s` inside `outage()`; latency by phase, /readyz, ids lost.

    Args:
        outage: a context manager that breaks the store while it is open.
        store_url: the store's SQLAlchemy URL, to look the returned prediction ids up afterwards.
        ids_wait_s: how long after the fault every returned id may take to reach the store.
    """
    readyz: Counter = Counter()

    async def fault(s: aiohttp.ClientSession, traffic: Traffic) -> dict:
        traffic.window = [float("inf"), float("inf")]
        await asyncio.sleep(before_s)
        traffic.window[0] = time.monotonic()
        async with outage():
            await poll_readyz(s, target, hold_s - (time.monotonic() - traffic.window[0]), readyz)
        traffic.window[1] = time.monotonic()
        return {"held_s": round(traffic.window[1] - traffic.window[0], 1)}

    result = await with_good_traffic(target, fault, good_clients, pause_s, timeout_s=hold_s + 30)
    traffic: Traffic = result["_traffic"]
    missing, waited = await asyncio.to_thread(ids_missing, store_url, traffic.ids, ids_wait_s)
    return {
        **result,
        "p99_before_ms": traffic.p99_ms("before"),
        "p99_during_ms": traffic.p99_ms("during"),
        "failed_during": traffic.summary(("during",))["good_failed"],
        "readyz_during": dict(readyz),
        "ids_returned": len(traffic.ids),
        "ids_lost": len(missing),
        "ids_all_stored_after_s": waited,
    }


async def poll_readyz(s: aiohttp.ClientSession, target: Target, seconds: float, seen: Counter) -> None:
    """GET /readyz every 0.5 s for `seconds`; count each (status, body status) seen."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        status, body, _ = await call(s, "GET", target.url("/readyz"), min(2.0, left), headers=target.headers)
        said = json_or_none(body)
        seen[f"{status} {said.get('status') if isinstance(said, dict) else '-'}"] += 1
        await asyncio.sleep(max(0.0, min(0.5, deadline - time.monotonic())))


def ids_missing(store_url: str, ids: list[str], wait_s: float) -> tuple[set[str], float | None]:
    """(ids not in the `predictions` table, seconds until all were there or None), polling for `wait_s`."""
    import sqlalchemy as sa

    # A plain engine: the store's own SQLite engine opens every transaction with BEGIN IMMEDIATE.
    engine = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    start, missing = time.monotonic(), set(ids)
    try:
        while missing:
            with contextlib.suppress(sa.exc.OperationalError):
                with engine.connect() as conn:
                    stored = {r[0] for r in conn.execute(sa.text("SELECT prediction_id FROM predictions"))}
                missing -= stored
            if not missing or time.monotonic() - start > wait_s:
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    return missing, None if missing else round(time.monotonic() - start, 1)


async def fault_big_body(
    target: Target, mb: float = 40.0, count: int = 1, good_clients: int = 4, settle_s: float = 1.0
) -> dict[str, Any]:
    """`count` bodies of `mb` MB (one giant JSON text) beside good clients; status, time, replica VmRSS."""
    body = b'{"text": "' + b"a" * max(0, int(mb * 2**20) - 13) + b'"}'
    answers: list[tuple[int, bytes, float]] = []
    rss_before = replica_rss_mb(target.app)

    async def fault(s: aiohttp.ClientSession, traffic: Traffic) -> dict:
        for _ in range(count):
            answers.append(
                await call(
                    s,
                    "POST",
                    target.url("/v1/predict"),
                    60,
                    data=body,
                    headers={**target.headers, "content-type": "application/json"},
                )
            )
        await asyncio.sleep(settle_s)
        return {}

    result = await with_good_traffic(target, fault, good_clients)
    first = answers[0] if answers else (0, b"", 0.0)
    reply = json_or_none(first[1])
    return {
        **result,
        "body_mb": mb,
        "body_statuses": {str(k): v for k, v in Counter(a[0] for a in answers).items()},
        "body_max_ms": round(max(a[2] for a in answers), 1) if answers else None,
        "body_error_shape": isinstance(reply, dict) and all(reply.get(k) for k in ("error", "where", "fix")),
        "rss_before_mb": rss_before,
        "rss_after_mb": replica_rss_mb(target.app),
    }


async def fault_random_paths(
    target: Target,
    counts: tuple[int, ...] = (3000, 30000),
    concurrency: int = 16,
    good_clients: int = 4,
    metrics_wait_s: float = 60.0,
) -> dict[str, Any]:
    """GETs of random /v1/<name> paths without a key until each total in `counts`; route tags and VmRSS after each.

    `counts` are running totals (3,000 then 27,000 more for 3,000 and 30,000).
    """
    statuses: Counter = Counter()
    after: dict[str, dict] = {}
    rss = {"0": replica_rss_mb(target.app)}

    async def fault(s: aiohttp.ClientSession, traffic: Traffic) -> dict:
        sent = 0
        for total in counts:
            await send_random_paths(s, target, total - sent, concurrency, statuses)
            sent = total
            after[str(total)] = await route_tags(s, target.app, statuses, metrics_wait_s)
            rss[str(total)] = replica_rss_mb(target.app)
        return {}

    result = await with_good_traffic(target, fault, good_clients, pause_s=0.05)
    return {
        **result,
        "statuses": {str(k): v for k, v in statuses.items()},
        "route_tags_after": after,
        "rss_mb": rss,
    }


async def send_random_paths(
    s: aiohttp.ClientSession, target: Target, n: int, concurrency: int, statuses: Counter
) -> None:
    """`n` GETs of /v1/<random name> without a key, `concurrency` at a time."""
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            status, _, _ = await call(s, "GET", target.url(f"/v1/{secrets.token_hex(6)}"), 30)
            statuses[status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fault_overload(
    target: Target, clients: int = 500, seconds: float = 10.0, timeout_s: float = 60.0
) -> dict[str, Any]:
    """`clients` send good single texts back to back for `seconds`: status counts, p99, a body per status."""
    answers: list[tuple[int, float]] = []
    samples: dict[str, str] = {}

    async def client(s: aiohttp.ClientSession, deadline: float, i: int) -> None:
        while time.monotonic() < deadline:
            i += 1
            status, body, ms = await predict_good(s, target, i, timeout_s)
            answers.append((status, ms))
            if status != 200:
                samples.setdefault(str(status), body[:300].decode(errors="replace"))

    async with session() as s:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(s, deadline, i) for i in range(clients)))
        ok = await recovered(s, target)
    statuses = Counter(str(a[0]) for a in answers)
    return {
        # Serve's 503s and 408s are the expected answers to overload: only other statuses count as failed.
        "good_sent": len(answers),
        "good_failed": sum(v for k, v in statuses.items() if k not in ("200", "503", "408")),
        "good_p99_ms": p99([ms for status, ms in answers if status == 200]),
        "recovered": ok,
        "clients": clients,
        "statuses": dict(statuses),
        "p99_ms": p99([ms for _, ms in answers]),
        "samples": samples,
    }


# --- replica memory and metrics ----------------------------------------------------------------------------
def replica_pid(app: str) -> int | None:
    """The pid of the app's replica process (its command line names `ServeReplica:<app>:`)."""
    marker = f"ServeReplica:{app}:".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    return None


def replica_rss_mb(app: str) -> float | None:
    """VmRSS of the app's replica process in MB."""
    pid = replica_pid(app)
    with contextlib.suppress(OSError, TypeError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_series(text: str, name: str, app: str) -> list[tuple[dict[str, str], float]]:
    """(tags, value) of each Prometheus series named `name` (or `ray_<name>`) of application `app`.

    Also the OpenTelemetry overflow series (tag otel_metric_overflow="true", no application): the metrics
    agent puts there whatever lies beyond its limit of distinct tag sets per metric (2,000 in ray 2.60).
    """
    out = []
    for line in text.splitlines():
        if not line.startswith((f"{name}{{", f"ray_{name}{{")):
            continue
        labels, _, value = line.rpartition("}")
        tags = dict(LABEL.findall(labels))
        if tags.get("application") == app or tags.get("otel_metric_overflow") == "true":
            out.append((tags, float(value.split()[0])))
    return out


def metrics_url() -> str:
    """The Prometheus endpoint of this node's Ray metrics agent."""
    import ray

    node = next(n for n in ray.nodes() if n.get("Alive"))
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


async def route_tags(s: aiohttp.ClientSession, app: str, sent: Counter, wait_s: float) -> dict[str, Any]:
    """The distinct `route` tags of the request-latency metric, once the export counts every request in `sent`.

    `sent` counts the random-path requests by status; the errors counter (route, status) must have caught up
    with them (or its overflow series taken them) before the tags are read: the agent exports with a delay.
    """
    url, start, text = metrics_url(), time.monotonic(), ""
    wanted = {str(k): v for k, v in sent.items() if k >= 400}
    fresh = False
    while not fresh and time.monotonic() - start < wait_s:
        await asyncio.sleep(1.0)
        status, body, _ = await call(s, "GET", url, 60)
        text = body.decode(errors="replace") if status == 200 else ""
        counted = sum(
            value
            for tags, value in metric_series(text, f"{ERRORS_METRIC}_total", app)
            if tags.get("status") in wanted or tags.get("otel_metric_overflow") == "true"
        )
        fresh = counted >= sum(wanted.values())
    series = metric_series(text, f"{LATENCY_METRIC}_count", app)
    routes = {tags.get("route") for tags, _ in series if tags.get("otel_metric_overflow") != "true"}
    outside = sorted(r for r in routes if r not in FIXED_ROUTES)
    return {
        "fresh": fresh,
        "waited_s": round(time.monotonic() - start, 1),
        "distinct": len(routes),
        "outside_fixed_set": len(outside),
        "overflowed": sum(v for tags, v in series if tags.get("otel_metric_overflow") == "true"),
        "sample": sorted(routes)[:12],
        "metrics_mb": round(len(text) / 2**20, 1),
    }


# --- PostgreSQL --------------------------------------------------------------------------------------------
class Postgres:
    """A throwaway PostgreSQL server in a temp dir on 127.0.0.1 (initdb, pg_ctl), run as `postgres` under root."""

    def __init__(self, bin_dir: Path = PG_BIN) -> None:
        self.bin = bin_dir
        # A short path: the server's unix socket lives in it, and socket paths are limited to ~107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="iopg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://intentops@127.0.0.1:{self.port}/postgres"
        self.run_as: dict = {}
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            pw = pwd.getpwnam("postgres")
            self.run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @staticmethod
    def missing(bin_dir: Path = PG_BIN) -> str | None:
        """Why no server can be started here, or None."""
        if not (bin_dir / "initdb").is_file():
            return f"PostgreSQL server binaries not found in {bin_dir} (set INTENTOPS_PG_BIN)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run the server as"
        return None

    def _pg(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            cwd=self.root,
            timeout=120,
            **self.run_as,
        )

    def start(self) -> None:
        """initdb (the first time), then start the server and wait until it accepts connections."""
        data = self.root / "data"
        if not data.exists():
            self._pg("initdb", "-D", str(data), "-U", "intentops", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -k {self.root} -p {self.port} -c fsync=off"
        log_file = str(self.root / "server.log")
        self._pg("pg_ctl", "-D", str(data), "-l", log_file, "-o", opts, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m <mode>`: fast ends the sessions and shuts down cleanly; immediate just quits."""
        if (self.root / "data" / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def create_schema(url: str) -> None:
    """An empty store at `url`, at the current schema version."""
    from intentops.feedback import store

    engine = store.make_engine(url)
    try:
        store.upgrade(engine)
    finally:
        engine.dispose()


# --- Serve -------------------------------------------------------------------------------------------------
@dataclass
class App:
    """One IntentService application on the running Serve instance: how it is deployed and reached."""

    name: str
    prefix: str
    user_config: dict
    env: dict[str, str]
    max_queued_requests: int
    max_ongoing_requests: int = 64
    num_cpus: float = 1.0

    def deploy(self) -> None:
        """serve.run the app with the overload limits set explicitly; returns when it is ready."""
        from ray import serve

        from intentops.api.service import IntentService

        service = IntentService.options(
            user_config=self.user_config,
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            graceful_shutdown_timeout_s=5,
            ray_actor_options={"num_cpus": self.num_cpus, "runtime_env": {"env_vars": self.env}},
            logging_config={"encoding": "JSON", "enable_access_log": False},
        )
        serve.run(service.bind(), name=self.name, route_prefix=self.prefix)

    def redeploy(self) -> None:
        """Delete the app (its replica with it) and deploy it again: a fresh replica."""
        from ray import serve

        serve.delete(self.name)
        self.deploy()

    def target(self, port: int) -> Target:
        return Target(
            f"http://127.0.0.1:{port}{self.prefix.rstrip('/')}", self.name, self.env.get("INTENTOPS_API_KEY")
        )


def replica_env(key: str | None, **extra: str) -> dict[str, str]:
    """The replica's environment, as serving/config.yaml deploys it, plus the API key and `extra`."""
    env = {"INTENTOPS_ROOT": str(ROOT), "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **extra}
    return {**env, "INTENTOPS_API_KEY": key} if key else env


def start_serve(port: int, request_timeout_s: float) -> None:
    """A local Ray (2 CPUs) and Serve's HTTP proxy on 127.0.0.1:`port` with the request timeout set."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": request_timeout_s})


def stop_serve() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def deployed_limits() -> tuple[float, int, int]:
    """(http_options.request_timeout_s, max_queued_requests, max_ongoing_requests) as serving/config.yaml sets
    them, else (5.0, 64, 64)."""
    import yaml

    config = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    deployment = config["applications"][0]["deployments"][0]
    return (
        float(config.get("http_options", {}).get("request_timeout_s") or 5.0),
        int(deployment.get("max_queued_requests") or 64),
        int(deployment.get("max_ongoing_requests") or 64),
    )


def benchmark_user_config(bundle: str, work: Path) -> dict:
    """user_config for `bundle` (a folder or `production`), with the SQLite store and the profiles in `work`."""
    create_schema(f"sqlite:///{work / 'queue.db'}")
    return {
        "bundle": bundle,
        "store": {"record_predictions": True, "db": str(work / "queue.db")},
        "monitoring": {"profiles": str(work / "profiles")},
    }


# --- the run -----------------------------------------------------------------------------------------------
FLAT_MB = 10.0  # replica VmRSS growth between the two random-path totals that still counts as flat


def fault_sizes(scale: float) -> dict[str, dict[str, Any]]:
    """Each fault's size arguments at `scale` (1.0: the issue's full forms); client counts do not scale."""

    def t(seconds: float) -> float:
        return round(max(1.0, seconds * scale), 2)

    def n(count: int) -> int:
        return max(1, int(count * scale))

    return {
        "hostile": {"count": n(38), "seconds": t(8.0)},
        "hangup": {"seconds": t(10.0)},
        "sqlite_lock": {"lock_s": t(40.0), "before_s": t(5.0)},
        "postgres": {"down_s": t(40.0), "before_s": t(5.0)},
        "big_body": {"mb": 40.0},
        "random_paths": {"counts": (n(3000), n(30000))},
        "overload": {"seconds": t(10.0)},
    }


def run_fault(name: str, app: App, port: int, work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """One fault against the main app (the postgres fault against its own app and server)."""
    target = app.target(port)
    if name == "postgres":
        return run_postgres_fault(app, port, work, sizes)
    runs = {
        "hostile": lambda: fault_hostile(target, **sizes),
        "hangup": lambda: fault_hangup(target, **sizes),
        "sqlite_lock": lambda: fault_sqlite_lock(target, work / "queue.db", **sizes),
        "big_body": lambda: fault_big_body(target, **sizes),
        "random_paths": lambda: fault_random_paths(target, **sizes),
        "overload": lambda: fault_overload(target, **sizes),
    }
    return asyncio.run(runs[name]())


def run_postgres_fault(main_app: App, port: int, work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """A throwaway PostgreSQL and a second app (/pg) on it, stopped and started under traffic; then removed."""
    from ray import serve

    reason = Postgres.missing()
    if reason:
        return {"skipped": reason}
    pg, app = Postgres(), None
    try:
        pg.start()
        create_schema(pg.url)
        (work / "pg").mkdir(exist_ok=True)
        app = App(
            "intentops_pg",
            "/pg",
            benchmark_user_config(main_app.user_config["bundle"], work / "pg"),
            replica_env(main_app.env.get("INTENTOPS_API_KEY"), INTENTOPS_DB_URL=pg.url),
            main_app.max_queued_requests,
            main_app.max_ongoing_requests,
        )
        app.deploy()
        return asyncio.run(fault_postgres(app.target(port), pg, **sizes))
    finally:
        if app is not None:
            with contextlib.suppress(Exception):
                serve.delete(app.name)
        pg.cleanup()


def settle(target: Target, wait_s: float = 30.0) -> float | None:
    """Seconds until the app answers normally again (see `recovered`), polling for `wait_s`; None if it never did."""

    async def poll() -> float | None:
        start = time.monotonic()
        async with session() as s:
            while time.monotonic() - start < wait_s:
                if await recovered(s, target, again_s=0.0):
                    return round(time.monotonic() - start, 1)
                await asyncio.sleep(1.0)
        return None

    return asyncio.run(poll())


def run_faults(names: list[str], app: App, port: int, work: Path, scale: float) -> dict[str, dict]:
    """Each fault in turn, from a healthy app: it is redeployed when the last fault left it unhealthy for 30 s."""
    out = {}
    sizes = fault_sizes(scale)
    for name in names:
        settled = settle(app.target(port))
        if settled is None:
            log("the app is still unhealthy after 30 s; redeploying it")
            app.redeploy()
        log(f"{name} {sizes[name]}")
        start = time.monotonic()
        try:
            result = public(run_fault(name, app, port, work, sizes[name]))
        except Exception as err:  # one broken fault must not lose the others' numbers
            log(f"{name} failed: {err!r}")
            result = {"error": f"{type(err).__name__}: {err}"}
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        result["healthy_before_after_s"] = settled  # how long the previous fault's effects lasted
        log(f"{name}: {json.dumps(result)[:600]}")
        out[name] = result
    return out


def musts(faults: dict[str, dict], timeout_s: float) -> dict[str, bool]:
    """The issue's acceptance criteria, each true or false, for the faults that ran."""
    ran = {k: v for k, v in faults.items() if "skipped" not in v and "error" not in v}
    m = {
        "every_fault_ran": not any("error" in v for v in faults.values()),
        "good_failed_0_everywhere": all(v["good_failed"] == 0 for v in ran.values()),
        "recovered_everywhere": all(v["recovered"] for v in ran.values()),
    }
    if "hostile" in ran:
        m["hostile_422_naming_index"] = (
            ran["hostile"]["hostile_422_naming_index"] == ran["hostile"]["hostile_sent"]
        )
    for db in ("sqlite_lock", "postgres"):
        if db in ran:
            before, during = ran[db]["p99_before_ms"], ran[db]["p99_during_ms"]
            m[f"{db}_p99_within_3x_unlocked"] = bool(before and during and during <= 3 * before)
            m[f"{db}_ids_lost_0"] = ran[db]["ids_lost"] == 0
    if "big_body" in ran:
        m["big_body_413"] = set(ran["big_body"]["body_statuses"]) == {"413"}
    if "random_paths" in ran:
        tags, rss = ran["random_paths"]["route_tags_after"], list(ran["random_paths"]["rss_mb"].values())
        m["route_tags_fixed_set_only"] = all(
            v["fresh"] and not v["outside_fixed_set"] and not v["overflowed"] for v in tags.values()
        )
        m["replica_memory_flat"] = None not in rss and rss[-1] - rss[1] < FLAT_MB
    if "overload" in ran:
        m["overload_only_200_503_408"] = set(ran["overload"]["statuses"]) <= {"200", "503", "408"}
        m["overload_p99_within_timeout"] = (ran["overload"]["p99_ms"] or 0) <= timeout_s * 1000
    return m


def resolve_bundle_arg(bundle: str | None) -> str:
    """The --bundle value as the app's user_config takes it: `production`, or an absolute folder."""
    from intentops.api import settings
    from intentops.config import load_params

    if bundle and bundle != settings.PRODUCTION:
        folder = Path(bundle).resolve()
    else:
        from omegaconf import OmegaConf

        serving = OmegaConf.to_container(load_params(ROOT / "params.yaml").serving, resolve=True)
        folder = settings.resolve_bundle({**serving, "bundle": settings.PRODUCTION}, ROOT)[0]
    if not folder.is_dir():
        sys.exit(
            f"serve_faults: no bundle at {folder}; fix: `dvc pull export` and copy models/bundle to the "
            "registry version the pointer names, or pass --bundle DIR"
        )
    return settings.PRODUCTION if not bundle or bundle == settings.PRODUCTION else str(folder)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder, or `production` (default)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every duration and request count")
    parser.add_argument(
        "--only", default=",".join(FAULTS), help=f"comma-separated faults: {','.join(FAULTS)}"
    )
    parser.add_argument("--request-timeout", type=float, default=None, help="Serve's http request_timeout_s")
    parser.add_argument("--max-queued", type=int, default=None, help="the deployment's max_queued_requests")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {','.join(FAULTS)}")
    return args


def main() -> None:
    args = parse_args()
    bundle = resolve_bundle_arg(args.bundle)
    os.chdir(ROOT)  # the settings' relative paths start at the project root
    timeout_s, max_queued, max_ongoing = deployed_limits()
    timeout_s, max_queued = args.request_timeout or timeout_s, args.max_queued or max_queued
    names = [f for f in FAULTS if f in args.only.split(",")]
    port, start = free_port(), time.monotonic()
    out: dict[str, Any] = {
        "bundle": bundle,
        "scale": args.scale,
        "serve": {
            "request_timeout_s": timeout_s,
            "max_queued_requests": max_queued,
            "max_ongoing_requests": max_ongoing,
        },
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
    }
    # Ray prints its processes' messages to stdout: they go to stderr, so stdout holds the JSON line only.
    with (
        tempfile.TemporaryDirectory(prefix="intentops-faults-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
    ):
        work = Path(tmp)
        app = App(
            "intentops",
            "/",
            benchmark_user_config(bundle, work),
            replica_env(secrets.token_hex(16)),
            max_queued,
            max_ongoing,
        )
        start_serve(port, timeout_s)
        try:
            log(f"deploying {bundle} on 127.0.0.1:{port}")
            app.deploy()
            out["faults"] = run_faults(names, app, port, work, args.scale)
        finally:
            stop_serve()
    out["musts"] = musts(out["faults"], timeout_s)
    out["elapsed_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

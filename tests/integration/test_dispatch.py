"""send_repository_dispatch against a real HTTP server on 127.0.0.1 that answers like GitHub."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from intentops.errors import UserError
from intentops.monitor.dispatch import send_repository_dispatch

TOKEN = "ghp_test-token-not-real"
REPO = "acme/intentops"


@dataclass
class FakeGitHub:
    """What the server received, and how it answers the next request."""

    url: str
    status: int = 204
    body: dict = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    fake = FakeGitHub(url=f"http://127.0.0.1:{server.server_address[1]}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length", 0))
            fake.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": json.loads(self.rfile.read(length) or b"null"),
                }
            )
            data = json.dumps(fake.body).encode() if fake.body else b""
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("GITHUB_API_URL", fake.url)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_posts_the_dispatch_github_expects(github: FakeGitHub) -> None:
    payload = {"reason": "psi above threshold", "features": {"text_length": 0.31}}

    send_repository_dispatch("drift-detected", payload)

    assert len(github.requests) == 1
    req = github.requests[0]
    assert req["method"] == "POST"
    assert req["path"] == f"/repos/{REPO}/dispatches"
    assert req["headers"]["Accept"] == "application/vnd.github+json"
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert req["headers"]["X-GitHub-Api-Version"] == "2022-11-28"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["body"] == {"event_type": "drift-detected", "client_payload": payload}


def test_arguments_override_the_environment(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_API_URL")
    send_repository_dispatch(
        "drift-detected", None, token="explicit", repository="other/repo", api_url=github.url + "/"
    )

    req = github.requests[0]
    assert req["path"] == "/repos/other/repo/dispatches"
    assert req["headers"]["Authorization"] == "Bearer explicit"
    assert req["body"] == {"event_type": "drift-detected", "client_payload": {}}


@pytest.mark.parametrize(
    ("status", "message", "hint"),
    [(401, "Bad credentials", "invalid or expired"), (404, "Not Found", "GITHUB_REPOSITORY")],
)
def test_refusal_is_a_user_error(github: FakeGitHub, status: int, message: str, hint: str) -> None:
    github.status, github.body = status, {"message": message}

    with pytest.raises(UserError) as exc:
        send_repository_dispatch("drift-detected", {"reason": "test"})

    text = exc.value.render()
    assert f"HTTP {status} {message}" in text
    assert f"/repos/{REPO}/dispatches" in text
    assert hint in text
    assert TOKEN not in text
    assert len(github.requests) == 1


@pytest.mark.parametrize("unset", ["GITHUB_TOKEN", "GITHUB_REPOSITORY"])
def test_missing_token_or_repository_sends_nothing(
    github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, unset: str
) -> None:
    monkeypatch.delenv(unset)

    with pytest.raises(UserError, match=unset):
        send_repository_dispatch("drift-detected", {})

    assert github.requests == []


def test_unreachable_api_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port that was free a moment ago: nothing listens there, so the connection is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{port}")

    with pytest.raises(UserError, match="could not reach the GitHub API"):
        send_repository_dispatch("drift-detected", {}, timeout=2)

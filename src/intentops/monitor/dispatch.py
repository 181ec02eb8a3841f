"""Start a GitHub Actions workflow from outside GitHub with a `repository_dispatch` event.

`intentops drift-check --dispatch` calls this with event type `drift-detected`, which
`.github/workflows/retrain.yml` listens for. Its client_payload carries the reviewed labels' DVC pointer
(`labels`: md5, size, counts; see labels_payload), never the labels themselves: CI pulls them from the
DVC remote.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import requests

from intentops.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
# GitHub's own limits on the request body; checking them here gives a clearer error than its 422.
MAX_EVENT_TYPE_CHARS = 100
MAX_PAYLOAD_KEYS = 10

# What to tell the user for the answers GitHub documents for this endpoint.
_FIXES = {
    401: "the token is invalid or expired: create a new one and set GITHUB_TOKEN",
    403: "the token may not write to this repository: a fine-grained token needs 'Contents: read and write', "
    "a classic token the 'repo' scope",
    404: "check GITHUB_REPOSITORY (owner/name) and that the token can see that repository",
    422: "GitHub rejected the body: check event_type and client_payload",
}


# The fields of a labels pointer that go in the payload; retrain.yml's `intentops labels receive` reads them.
LABELS_PAYLOAD_KEYS = ("md5", "size", "new_labels", "rows")


def labels_payload(published: Mapping[str, Any]) -> dict[str, Any]:
    """The payload's `labels` object: the DVC pointer (md5, size) and the counts, nested under one key
    so that the payload stays within GitHub's 10 top-level keys."""
    return {key: published[key] for key in LABELS_PAYLOAD_KEYS}


def send_repository_dispatch(
    event_type: str,
    client_payload: Mapping[str, Any] | None = None,
    *,
    token: str | None = None,
    repository: str | None = None,
    api_url: str | None = None,
    timeout: float = 10.0,
) -> None:
    """POST a `repository_dispatch` event to `{api_url}/repos/{owner}/{repo}/dispatches`.

    Args:
        event_type: the name workflows match in `on.repository_dispatch.types`, e.g. `drift-detected`.
        client_payload: JSON object passed to the workflow as `github.event.client_payload`.
        token: a GitHub token; defaults to `$GITHUB_TOKEN`.
        repository: `owner/name`; defaults to `$GITHUB_REPOSITORY`.
        api_url: the REST API root; defaults to `$GITHUB_API_URL`, then https://api.github.com.
        timeout: seconds to wait for GitHub before giving up.

    Raises:
        UserError: the token or repository is missing, the event is malformed, GitHub cannot be
            reached, or it answers anything but 2xx (it answers 204 on success).
    """
    token = token or os.environ.get("GITHUB_TOKEN")
    repository = repository or os.environ.get("GITHUB_REPOSITORY")
    api_url = (api_url or os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
    payload = dict(client_payload or {})
    _check_request(event_type, payload, token=token, repository=repository)

    url = f"{api_url}/repos/{repository}/dispatches"
    headers = {
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "X-GitHub-Api-Version": API_VERSION,
    }
    body = {"event_type": event_type, "client_payload": payload}
    try:
        response = requests.post(url, headers=headers, json=body, timeout=timeout)
    except requests.RequestException as err:
        raise UserError(
            f"could not reach the GitHub API ({type(err).__name__})",
            where=url,
            fix="check the network and GITHUB_API_URL (GitHub Enterprise: https://HOST/api/v3)",
        ) from err

    if not 200 <= response.status_code < 300:
        raise UserError(
            f"GitHub refused the '{event_type}' dispatch: HTTP {response.status_code} {_message(response)}",
            where=f"POST {url}",
            fix=_FIXES.get(
                response.status_code, "retry later; if it persists, see https://www.githubstatus.com"
            ),
        )
    log.info("sent repository_dispatch '%s' to %s (HTTP %d)", event_type, repository, response.status_code)


def _check_request(
    event_type: str, payload: dict[str, Any], *, token: str | None, repository: str | None
) -> None:
    """Raise a UserError for anything GitHub would refuse, before any request is sent."""
    if not token:
        raise UserError(
            "no GitHub token to send the repository_dispatch with",
            where="environment variable GITHUB_TOKEN",
            fix="export GITHUB_TOKEN=<a token that may write to the repository's contents>",
        )
    owner, _, name = (repository or "").partition("/")
    if not owner or not name or "/" in name:
        raise UserError(
            f"repository must be 'owner/name', got {repository!r}",
            where="environment variable GITHUB_REPOSITORY",
            fix="export GITHUB_REPOSITORY=owner/name",
        )
    if not event_type or len(event_type) > MAX_EVENT_TYPE_CHARS:
        raise UserError(
            f"event_type must be 1-{MAX_EVENT_TYPE_CHARS} characters, got {event_type!r}",
            where="event_type",
            fix="use the type the workflow listens for, e.g. 'drift-detected'",
        )
    if len(payload) > MAX_PAYLOAD_KEYS:
        raise UserError(
            f"client_payload has {len(payload)} top-level keys; GitHub accepts at most {MAX_PAYLOAD_KEYS}",
            where="client_payload",
            fix="nest the details under fewer keys",
        )
    try:
        json.dumps(payload)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"client_payload is not JSON-serialisable: {err}",
            where="client_payload",
            fix="pass only str, numbers, bools, None, lists and dicts",
        ) from err


def _message(response: requests.Response) -> str:
    """GitHub's own explanation from an error body, or a short excerpt of whatever came back."""
    try:
        return str(response.json().get("message", "")).strip()
    except (ValueError, AttributeError):
        return response.text[:200].strip()

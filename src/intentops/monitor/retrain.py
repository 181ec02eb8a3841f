"""`intentops drift-check --retrain`: close the loop when drift is found and enough reviewed labels exist.

In order: publish the reviewed labels (`intentops labels publish`: check their count, export, `dvc add`,
`dvc push` when a remote is configured; `--dispatch` runs the same), `dvc repro` (ingest picks up the
labels; DVC reruns only the stages whose inputs changed), read the promotion gate that the `promote` stage
wrote, and, when a serving URL is given, wait until the running app has hot-swapped to the promoted version
(it polls the registry's production pointer itself).

Exit codes (documented in README.md and docs/operations.md): 0 promoted (and swapped; with the promote target
`candidate`: staged as the registry's candidate), 11 drift but too few new reviewed labels, 12 retrained but
the gate kept the champion, 2 any other error.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from intentops.config import API_KEY_ENV
from intentops.errors import UserError
from intentops.feedback.publish import TOO_FEW_LABELS_EXIT_CODE, TooFewLabels

__all__ = ["TOO_FEW_LABELS_EXIT_CODE", "NOT_PROMOTED_EXIT_CODE", "TooFewLabels", "NotPromoted", "retrain"]

log = logging.getLogger(__name__)

NOT_PROMOTED_EXIT_CODE = 12


class NotPromoted(UserError):
    """The pipeline retrained, but the gate kept the champion in production."""

    exit_code = NOT_PROMOTED_EXIT_CODE


def stages_run(output: str) -> dict[str, list[str]]:
    """Which stages a `dvc repro` output says it ran, restored from the run-cache, or skipped as unchanged."""
    out: dict[str, list[str]] = {"ran": [], "restored": [], "unchanged": []}
    for line in output.splitlines():
        name = line.split("'")[1] if line.count("'") >= 2 else None
        if line.startswith("Running stage"):
            out["ran"].append(name)
        elif line.startswith("Stage") and "is cached" in line:
            out["restored"].append(name)
        elif line.startswith("Stage") and "didn't change" in line:
            out["unchanged"].append(name)
    return out


def dvc_repro(root: Path, log_line: Callable[[str], None] = print) -> tuple[float, str]:
    """Run `dvc repro` in `root` with this interpreter's tools first on PATH; returns (seconds, its output)."""
    from intentops.scratch import tool_env

    env = tool_env()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro"],  # tool_env puts this interpreter's dvc first on PATH
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    for line in proc.stdout:  # stage names and our stages' summaries, as they come
        lines.append(line)
        line = line.rstrip()
        if line.startswith(("Running stage", "Stage ")) or " INFO __main__" in line:
            log_line(f"  dvc: {line[:200]}")
    if proc.wait() != 0:
        raise UserError(
            f"`dvc repro` failed (exit {proc.returncode}); its last lines:\n" + "".join(lines[-20:]),
            where=str(root),
            fix="fix the failing stage (see above), then rerun `intentops drift-check "
            "--retrain` or `dvc repro`; the last good model is still in production",
        )
    return time.perf_counter() - t0, "".join(lines)


def read_gate(path: str | os.PathLike) -> dict[str, Any]:
    """The promotion gate's decision (the promote stage's paths.promote_gate)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            "no promotion gate result after `dvc repro`",
            where=str(path),
            fix="check that dvc.yaml has the promote stage and that it ran",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def wait_for_swap(
    serve_url: str, version: str, timeout_s: float, poll_s: float = 1.0, api_key: str | None = None
) -> float:
    """Poll GET <serve_url>/v1/model until it serves `version`; returns the seconds waited.

    The API key is `api_key`, else the first entry of $INTENTOPS_API_KEY (a `name=key` entry is accepted whole).
    """
    headers = {}
    key = api_key or (os.environ.get(API_KEY_ENV) or "").split(",")[0].strip()
    if key:
        headers["X-API-Key"] = key
    t0 = time.perf_counter()
    seen = None
    while time.perf_counter() - t0 < timeout_s:
        try:
            req = urllib.request.Request(f"{serve_url.rstrip('/')}/v1/model", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                seen = json.loads(resp.read())["version"]
            if seen == version:
                return time.perf_counter() - t0
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            seen = f"unreachable ({err})"
        time.sleep(poll_s)
    raise UserError(
        f"serving did not swap to {version} within {timeout_s:.0f} s (it serves {seen})",
        where=f"{serve_url}/v1/model",
        fix="check that the app watches the production pointer (user_config.bundle: production, "
        "watch_interval_s > 0) and its replica logs for a failed reload",
    )


def require_promotion(gate: Mapping[str, Any], before: str | None, after: str | None, gate_path: str) -> None:
    """Raise NotPromoted unless the gate promoted a model other than the one in production before."""
    if gate.get("promoted") and after != before:
        return
    raise NotPromoted(
        f"retrained, but production stays {before}: "
        + (
            "; ".join(gate.get("reasons", []))
            if not gate.get("promoted")
            else f"the challenger {gate.get('challenger')} is the model already in production"
        ),
        where=str(gate_path),
        fix="read the gate's reasons; label more (or better) data, or change the model, and rerun",
    )


def retrain(
    params: Any, report: Mapping[str, Any], serve_url: str | None = None, root: Path | None = None
) -> dict[str, Any]:
    """Publish the labels, `dvc repro`, read the gate and wait for the swap; see the module docstring.

    A report that `--dispatch` already published labels for (report["labels"]) is not published twice:
    the second count would find nothing new.

    Raises:
        TooFewLabels, NotPromoted, UserError: see the exit codes above.
    """
    from intentops.feedback.publish import publish
    from intentops.inference.registry import Registry, registry_url

    cfg, paths = params.monitor.retrain, params.paths
    root = Path(root or Path.cwd())
    t0 = time.perf_counter()
    print("retrain 1/4: publishing the reviewed labels (count, export, dvc add, dvc push)", flush=True)
    labels = report.get("labels") or publish(
        params, root, reason=f"drift in {', '.join(report['drifted_features'])}"
    )
    before = Registry.at(registry_url(paths.registry_dir)).production()
    print("retrain 2/4: dvc repro (only stages whose inputs changed rerun)", flush=True)
    repro_s, repro_out = dvc_repro(root, lambda line: print(line, flush=True))
    gate = read_gate(paths.promote_gate)
    after = Registry.at(registry_url(paths.registry_dir)).production()
    print(
        f"retrain 3/4: gate {'PROMOTED' if gate.get('promoted') else 'rejected'} {gate.get('challenger')} "
        f"(champion {gate.get('champion')}): {'; '.join(gate.get('reasons', []))}",
        flush=True,
    )
    result = {
        "new_labels": labels["new_labels"],
        "exported_rows": labels["rows"],
        "labels": labels,
        "repro_seconds": round(repro_s, 1),
        "stages": stages_run(repro_out),
        "gate": gate,
        "production_before": before,
        "production_after": after,
    }
    if gate.get("promoted") and gate.get("target") == "candidate":  # $INTENTOPS_PROMOTE_TARGET=candidate
        print(f"retrain 4/4: {gate.get('challenger')} staged as the candidate; production stays {before}")
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return result  # nothing to swap to yet: `intentops registry promote` moves production later
    require_promotion(gate, before, after, paths.promote_gate)
    print(f"retrain 4/4: production {before} -> {after}", flush=True)
    if serve_url:
        result["swap_seconds"] = round(wait_for_swap(serve_url, after, float(cfg.swap_timeout_s)), 1)
        print(
            f"serving at {serve_url} swapped to {after} ({result['swap_seconds']} s waited after dvc repro ended)",
            flush=True,
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result

"""`intentops labels publish | restore | receive`: the reviewed labels travel through DVC, never through git.

labels.csv holds customer text, so git keeps only its DVC pointer (labels.csv.dvc: md5 and size) and the
file itself lives in the DVC cache and remote, under the remote's retention policy.

- `publish` (where the review-queue database lives; `drift-check --retrain` and `--dispatch` both call it,
  so the local and the CI path cannot drift apart): refuse too few new reviewed labels (exit 11), export
  them, `dvc add` the file and `dvc push` it when a remote is configured.
- `restore` (`make run`, scratch projects): bring back a missing labels.csv: the header-only file when the
  pointer names it (a fresh clone needs no remote), else `dvc pull` (or the local cache).
- `receive` (retrain.yml on `repository_dispatch`): write the pointer from the dispatch payload, pull it,
  and count the labels new against the ones at HEAD's pointer; too few ends the run early and green.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from intentops.errors import UserError

TOO_FEW_LABELS_EXIT_CODE = 11
POINTER_ENV = "LABELS_POINTER"  # retrain.yml passes the payload's `labels` object here, as JSON
_MD5 = re.compile(r"[0-9a-f]{32}")


class TooFewLabels(UserError):
    """Fewer new reviewed labels than `monitor.retrain.min_new_labels`: label more first."""

    exit_code = TOO_FEW_LABELS_EXIT_CODE


def header_bytes() -> bytes:
    """labels.csv with no rows, as `intentops label export` writes it (what the pointer on main names)."""
    from intentops.feedback.label import EXPORT_COLUMNS

    return (",".join(EXPORT_COLUMNS) + "\n").encode()


def pointer_path(labels: str | os.PathLike) -> Path:
    """The DVC pointer git keeps for a labels file (`dvc add` names it <file>.dvc)."""
    return Path(f"{labels}.dvc")


def read_pointer(labels: str | os.PathLike) -> dict[str, Any]:
    """{"md5", "size"} of the labels file named by its DVC pointer."""
    path = pointer_path(labels)
    fix = "restore it from git (`git checkout -- PATH`), or create it with `intentops labels publish`"
    if not path.is_file():
        raise UserError("the DVC pointer of the reviewed labels is missing", where=str(path), fix=fix)
    import yaml

    try:
        (out,) = yaml.safe_load(path.read_text(encoding="utf-8"))["outs"]
        return check_pointer({"md5": out["md5"], "size": out["size"]}, str(path))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"not a DVC pointer with one output ({err})", where=str(path), fix=fix) from err


def check_pointer(obj: Any, where: str) -> dict[str, Any]:
    """The pointer's md5 (32 lowercase hex) and size (int >= 0), checked; anything else is refused."""
    md5 = obj.get("md5") if isinstance(obj, dict) else None
    size = obj.get("size") if isinstance(obj, dict) else None
    if not isinstance(md5, str) or not _MD5.fullmatch(md5) or type(size) is not int or size < 0:
        raise UserError(
            f"a labels pointer needs md5 (32 lowercase hex digits) and size (an integer >= 0), got {obj!r}",
            where=where,
            fix="send the dispatch with `intentops drift-check --dispatch` (it publishes the labels first)",
        )
    return {"md5": md5, "size": size}


def write_pointer(labels: str | os.PathLike, pointer: dict[str, Any]) -> Path:
    """Write <labels>.dvc as `dvc add` does (DVC 3 format: `hash: md5`)."""
    import yaml

    out = {"md5": pointer["md5"], "size": pointer["size"], "hash": "md5", "path": Path(labels).name}
    path = pointer_path(labels)
    path.write_text(yaml.safe_dump({"outs": [out]}, sort_keys=False), encoding="utf-8")
    return path


def dvc(args: list[str], root: str | os.PathLike) -> str:
    """Run `dvc ARGS` in `root` with this interpreter's dvc; its output, or a UserError saying what failed."""
    from intentops.scratch import tool_env

    proc = subprocess.run(["dvc", *args], cwd=root, env=tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}",
            where=str(root),
            fix="check the DVC remote (`dvc remote list`, its credentials) and that this is the project root",
        )
    return proc.stdout


def remote_configured(root: str | os.PathLike) -> bool:
    """Whether DVC has a default remote (any config level: CI writes it to .dvc/config.local)."""
    return bool(dvc(["config", "core.remote"], root).strip())


def exported_ids(labels_csv: str | os.PathLike) -> set[str]:
    """The prediction ids already in a labels file (they are in the training data of the current model)."""
    path = Path(labels_csv)
    if not path.is_file():
        return set()
    with path.open(newline="", encoding="utf-8") as f:
        return {row["prediction_id"] for row in csv.DictReader(f) if row.get("prediction_id")}


def new_label_count(params: Any) -> tuple[int, dict[str, int]]:
    """(resolved labels in the store that the labels file does not hold yet, status of every queue item)."""
    from intentops.feedback.label import review_export, review_of

    table, status = review_export(review_of(params), params)
    known = exported_ids(params.paths.feedback_labels)
    return int((~table["prediction_id"].isin(known)).sum()), status


def require_new_labels(params: Any, reason: str | None = None) -> int:
    """The number of new reviewed labels; raises TooFewLabels below monitor.retrain.min_new_labels."""
    from intentops.feedback.store import DB_URL_ENV

    minimum, paths = int(params.monitor.retrain.min_new_labels), params.paths
    n_new, status = new_label_count(params)
    if n_new < minimum:
        raise TooFewLabels(
            f"{reason + ', but ' if reason else ''}only {n_new} new reviewed label(s) (queue status: "
            f"{status}); retraining needs at least {minimum}",
            where=f"review queue ({paths.feedback_db} or ${DB_URL_ENV})",
            fix="label the queue (`intentops label --annotator NAME`, several annotators), then rerun; "
            "or lower monitor.retrain.min_new_labels",
        )
    return n_new


def publish(params: Any, root: str | os.PathLike = ".", reason: str | None = None) -> dict[str, Any]:
    """Check the count, export, `dvc add`, and `dvc push` when a remote is configured; returns the pointer.

    Returns:
        {"md5", "size", "new_labels", "rows", "pushed"}: what the dispatch's client_payload carries.

    Raises:
        TooFewLabels: fewer new reviewed labels than monitor.retrain.min_new_labels (nothing exported).
    """
    from intentops.feedback.label import main_export

    labels = params.paths.feedback_labels
    n_new = require_new_labels(params, reason)
    print(f"publish: exporting {n_new} new reviewed label(s) to {labels}", flush=True)
    exported = main_export(params)
    dvc(["add", "-q", str(labels)], root)
    pointer = read_pointer(Path(root) / labels)
    pushed = remote_configured(root)
    if pushed:
        dvc(["push", "-q", str(pointer_path(labels))], root)
    print(
        f"publish: {pointer_path(labels)} md5 {pointer['md5']}, {pointer['size']} bytes; "
        + ("pushed to the DVC remote" if pushed else "no DVC remote configured: kept in the local cache"),
        flush=True,
    )
    return {**pointer, "new_labels": n_new, "rows": int(exported["rows"]), "pushed": pushed}


def file_md5(path: str | os.PathLike) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def restore(labels: str | os.PathLike, root: str | os.PathLike = ".") -> str:
    """Bring back a missing labels file from its pointer; says how (a present file is left as it is)."""
    labels, root = Path(labels), Path(root)
    where = root / labels
    pointer = read_pointer(where)
    if where.is_file():
        same = file_md5(where) == pointer["md5"]
        return "present" + ("" if same else " (differs from its pointer: `intentops labels publish` it)")
    if pointer["md5"] == hashlib.md5(header_bytes()).hexdigest():
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(header_bytes())
        if (
            root / ".dvc"
        ).is_dir():  # into the DVC cache too, so a later `dvc push` carries it (pointer unchanged)
            dvc(["commit", "-q", "-f", str(pointer_path(labels))], root)
        return "header-only"
    if remote_configured(root):
        dvc(["pull", "-q", str(pointer_path(labels))], root)
        return "pulled"
    try:
        dvc(["checkout", "-q", str(pointer_path(labels))], root)
        return "checked out from the local DVC cache"
    except UserError as err:
        raise UserError(
            f"{labels} is missing and its pointer names reviewed labels (md5 {pointer['md5']}) that are "
            "neither in the local DVC cache nor reachable: no DVC remote is configured",
            where=str(pointer_path(where)),
            fix="configure the remote (`dvc remote add --local --default NAME URL`), then `intentops labels "
            "restore` (or `dvc pull`)",
        ) from err


def receive(
    params: Any, payload: str | None, root: str | os.PathLike = "."
) -> tuple[bool, dict[str, Any], str]:
    """retrain.yml's labels step: (retrain?, counts, summary markdown) for the pointer in `payload` (JSON).

    Counts the rows of the received labels whose prediction_id is not in the labels at HEAD's pointer
    (restored first), against monitor.retrain.min_new_labels: the drift side's check, redone on what CI got.
    """
    labels, root = Path(params.paths.feedback_labels), Path(root)
    try:
        sent = json.loads(payload or "null")
    except ValueError as err:
        raise UserError(f"not JSON: {err}", where=f"${POINTER_ENV}", fix="see retrain.yml") from err
    pointer = check_pointer(sent, f"${POINTER_ENV} (the dispatch's client_payload.labels)")
    restore(labels, root)
    known = exported_ids(root / labels)
    before = read_pointer(root / labels)
    write_pointer(root / labels, pointer)
    (root / labels).unlink()
    how = restore(labels, root)
    received = exported_ids(root / labels)
    n_new, minimum = len(received - known), int(params.monitor.retrain.min_new_labels)
    counts = {"new_labels": n_new, "min_new_labels": minimum, "rows": len(received), "how": how}
    go = n_new >= minimum
    summary = (
        f"## Reviewed labels: {n_new} new\n\n{labels} md5 {before['md5']} (HEAD) → {pointer['md5']} "
        f"({how}): {len(received)} labelled rows, {n_new} not at HEAD; the drift side counted "
        f"{sent.get('new_labels', '?')}.\n\n"
        + (
            f"Retraining (threshold monitor.retrain.min_new_labels = {minimum}).\n"
            if go
            else f"**Too few new reviewed labels ({n_new} < {minimum}): not retraining.** The run ends "
            "here, green (the drift side's exit 11). Label more, then dispatch again.\n"
        )
    )
    return go, counts, summary


def main_publish(params: Any) -> dict[str, Any]:
    """`intentops labels publish`: print the pointer the dispatch would carry, as one JSON line."""
    result = publish(params)
    print(json.dumps(result))
    return result


def main_restore(params: Any) -> str:
    """`intentops labels restore` (`make run`): make sure the labels file the pipeline reads is there."""
    how = restore(params.paths.feedback_labels)
    print(f"{params.paths.feedback_labels}: {how}")
    return how


def main_receive(params: Any) -> bool:
    """`intentops labels receive`: the pointer from $LABELS_POINTER; outputs and summary for GitHub Actions."""
    go, counts, summary = receive(params, os.environ.get(POINTER_ENV))
    lines = [f"retrain={str(go).lower()}", f"new_labels={counts['new_labels']}"]
    with open(os.environ.get("GITHUB_OUTPUT") or os.devnull, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    with open(os.environ.get("GITHUB_STEP_SUMMARY") or os.devnull, "a", encoding="utf-8") as f:
        f.write(summary)
    print(summary, flush=True)
    return go

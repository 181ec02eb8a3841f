"""Parse raw dataset bytes into the canonical table: text, label, origin_split, source_id."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from typing import Any

import pandas as pd

from intentops.data import CANONICAL_COLUMNS
from intentops.data.text import text_problem
from intentops.errors import UserError

_WS = re.compile(r"\s+")
TEXT_FIX = (
    "remove the character, or re-export the file as UTF-8 text: control characters other than tab, CR and LF, "
    "lone surrogates and noncharacters are refused (docs/labeling-guidelines.md, What a text may contain)"
)


def normalise_text(text: str) -> str:
    """Canonical form of an utterance: NFC, inner whitespace (newlines included) collapsed, trimmed."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def match_key(text: str) -> str:
    """The key two utterances are 'the same text' under: normalised, case-folded."""
    return normalise_text(text).casefold()


def decode_utf8(data: bytes, where: str) -> str:
    """Decode strictly, dropping one leading BOM (utf-8-sig); on failure name the line and byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"bytes that are not valid UTF-8 at line {line} (byte offset {err.start}: {data[err.start : err.start + 4]!r})",
            where=f"{where}:{line}",
            fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)",
        ) from err


def read_csv_rows(
    data: bytes, where: str, split: str, text_column: str, label_column: str, delimiter: str = ","
) -> pd.DataFrame:
    """Read a labelled CSV with strict RFC-4180 quoting.

    Args:
        data: the raw file content.
        where: a name for error messages (the file's location).
        split: the origin split recorded for every row.
    """
    text = decode_utf8(data, where)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(
            "the CSV has no header row", where=where, fix="add a header naming the columns"
        ) from None
    except csv.Error as err:
        raise UserError(
            f"broken CSV header: {err}", where=f"{where}:1", fix="fix the quoting of the header"
        ) from err
    header = [h.strip() for h in header]
    missing = [c for c in (text_column, label_column) if c not in header]
    if missing:
        raise UserError(
            f"missing column(s) {missing}; the header has {header}",
            where=f"{where}:1",
            fix="rename the columns, or set data.text_column / data.label_column (and data.delimiter) to match",
        )
    records = csv_records(
        reader, len(header), header.index(text_column), header.index(label_column), where, split
    )
    if not records:
        raise UserError(
            "the CSV has a header but no rows", where=where, fix="check you exported the data rows"
        )
    return pd.DataFrame.from_records(records, columns=CANONICAL_COLUMNS)


def csv_records(
    reader: Any, n_fields: int, ti: int, li: int, where: str, split: str
) -> list[tuple[str, str, str, str]]:
    """The canonical records of a CSV's data rows (after the header): text, label, split, `file:line`.

    Raises:
        UserError: naming `where:line` for a row with the wrong number of fields, broken quoting, or a text
            or label cell that breaks the text rules (intentops.data.text.text_problem).
    """
    records = []
    file = where.rsplit("/", 1)[-1]
    try:
        for row in reader:
            if not row:  # a blank line between records
                continue
            if len(row) != n_fields:
                raise UserError(
                    f"row has {len(row)} fields, the header has {n_fields} (broken quoting or a stray delimiter?)",
                    where=f"{where}:{reader.line_num}",
                    fix='quote fields that contain the delimiter, and double any quote inside a field ("")',
                )
            check_cells(row[ti], row[li], f"{where}:{reader.line_num}")
            records.append((normalise_text(row[ti]), row[li].strip(), split, f"{file}:{reader.line_num}"))
    except csv.Error as err:
        raise UserError(
            f"broken CSV quoting: {err}",
            where=f"{where}:{reader.line_num}",
            fix='close every quoted field and double any quote inside a field ("")',
        ) from err
    return records


def check_cells(text: str, label: str, where: str) -> None:
    """Apply the text rules to a row's text and label, before normalising (which would hide some characters).

    Raises:
        UserError: naming the cell, the character and its position.
    """
    for column, value in (("text", text), ("label", label)):
        problem = text_problem(value)
        if problem is not None:
            raise UserError(f"the {column} holds a {problem}", where=where, fix=TEXT_FIX)


FEEDBACK_SPLIT = "feedback"
NEW_INTENT_PREFIX = "new:"
_INTENT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def read_feedback(data: bytes, where: str) -> tuple[pd.DataFrame, list[str]]:
    """Read `intentops label export`'s CSV (columns `text`, `label`, provenance after them).

    A header without rows is valid (no feedback yet). A label `new:<snake_case_name>` is an intent a
    labeller proposed (docs/labeling-guidelines.md): the row keeps `<name>` as its label and the name is
    returned so that the taxonomy can be extended with it.

    Returns:
        (canonical rows with origin_split "feedback", the proposed intent names in order of appearance)
    """
    text = decode_utf8(data, where)
    if not text.strip():
        raise UserError(
            "the feedback file is empty (not even a header)",
            where=where,
            fix="restore it with `git checkout -- <file>`, or write it with `intentops label export`",
        )
    body = [line for line in text.splitlines()[1:] if line.strip()]
    if not body:
        header = next(csv.reader(io.StringIO(text)))
        missing = [c for c in ("text", "label") if c not in [h.strip() for h in header]]
        if missing:
            raise UserError(
                f"missing column(s) {missing}; the header has {header}",
                where=f"{where}:1",
                fix="write the file with `intentops label export`",
            )
        return pd.DataFrame(columns=CANONICAL_COLUMNS), []
    rows = read_csv_rows(data, where, FEEDBACK_SPLIT, "text", "label")
    proposed: list[str] = []
    for i, label in rows["label"].items():
        if not label.startswith(NEW_INTENT_PREFIX):
            continue
        name = label[len(NEW_INTENT_PREFIX) :]
        if not _INTENT_NAME.fullmatch(name):
            raise UserError(
                f"proposed intent {label!r} is not new:<snake_case_name>",
                where=f"{where}:{rows.at[i, 'source_id'].rsplit(':', 1)[-1]}",
                fix="name new intents in lower snake_case (docs/labeling-guidelines.md), e.g. new:card_upgrade",
            )
        rows.at[i, "label"] = name
        if name not in proposed:
            proposed.append(name)
    return rows, proposed


def read_clinc_json(data: bytes, where: str, oos_label: str = "oos") -> pd.DataFrame:
    """Read an oos-eval JSON file: {split: [[text, intent], ...]}; `oos_*` splits keep their name."""
    try:
        obj = json.loads(decode_utf8(data, where))
    except json.JSONDecodeError as err:
        raise UserError(
            f"invalid JSON: {err.msg}", where=f"{where}:{err.lineno}:{err.colno}", fix="re-download the file"
        ) from err
    if not isinstance(obj, dict):
        raise UserError(
            "expected a JSON object of splits", where=where, fix="use an oos-eval data_*.json file"
        )
    file = where.rsplit("/", 1)[-1]
    records = []
    for split, rows in obj.items():
        for i, pair in enumerate(rows):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UserError(
                    f"expected [text, intent], got {pair!r}",
                    where=f"{where}: {split}[{i}]",
                    fix="re-download the file",
                )
            check_cells(pair[0], pair[1], f"{where}: {split}[{i}]")
            records.append((normalise_text(pair[0]), pair[1].strip(), split, f"{file}:{split}:{i}"))
    return pd.DataFrame.from_records(records, columns=CANONICAL_COLUMNS)


def read_taxonomy(data: bytes, where: str) -> list[str]:
    """A taxonomy file: a JSON list of labels, or plain text with one label per line."""
    text = decode_utf8(data, where)
    try:
        labels = json.loads(text)
    except json.JSONDecodeError:
        labels = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)):
        raise UserError(
            "the taxonomy must be a non-empty list of label names",
            where=where,
            fix='write a JSON list (["card_arrival", ...]) or one label per line',
        )
    labels = [x.strip() for x in labels]
    for i, label in enumerate(labels):
        problem = text_problem(label)
        if problem is not None:
            raise UserError(f"taxonomy label {i + 1} holds a {problem}", where=where, fix=TEXT_FIX)
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(f"the taxonomy lists labels twice: {dupes}", where=where, fix="remove the repeats")
    return labels

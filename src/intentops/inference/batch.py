"""Batch prediction (`intentops predict`): a table of texts in, the same table with the Predictor's fields out.

Every input row and column is kept, in order; the columns `intent`, `confidence`, `out_of_scope`, `reason`,
`needs_review` and `top_k` are added, exactly as `Predictor.predict` returns them. Tables are CSV, Parquet or
JSON lines, chosen by the file extension. `top_k` is a list of {"intent", "confidence"} in Parquet and JSON
lines, and that list as a JSON string in CSV (which has no nested values). The output is written to a
temporary file beside it and renamed, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from intentops.errors import UserError
from intentops.inference.predictor import Predictor
from intentops.inference.registry import Registry
from intentops.io import atomic_path
from intentops.timing import progress as progress_bar

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# The fields of Predictor.predict, in the order the output gets them.
FIELDS = ("intent", "confidence", "out_of_scope", "reason", "needs_review", "top_k")
DEFAULT_BATCH_SIZE = 256
# Rows named in an error about bad texts; the count says how many more there are.
SHOWN_ROWS = 5


def table_format(path: str | os.PathLike) -> str:
    """The table format of `path` from its extension ("csv", "parquet" or "jsonl"); a UserError for any other."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(
            f"cannot tell the table format of {Path(path).name!r} from its extension",
            where=str(path),
            fix=f"use one of {', '.join(FORMATS)} (CSV, Parquet, JSON lines)",
        )
    return fmt


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV (every value as text, as written), Parquet or JSON-lines file into a DataFrame."""
    fmt = table_format(path)
    try:
        if fmt == "csv":
            # Text as written: no type guessing, so "007" and "NA" come back unchanged in the output.
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    except FileNotFoundError as err:
        raise UserError("input file not found", where=str(path), fix="check the path") from err
    except (OSError, ValueError, ImportError) as err:  # pandas and pyarrow raise ValueError subclasses
        raise UserError(
            f"cannot read the input as {fmt}: {err}",
            where=str(path),
            fix=f"check that it is a valid {fmt} file, or give it the extension of its real format",
        ) from err


def input_texts(frame: pd.DataFrame, column: str, where: str) -> list[str]:
    """The texts of `column`: a UserError when the column is missing, there are no rows, or a text is empty."""
    if column not in frame.columns:
        raise UserError(
            f"no column {column!r} in the input (columns: {', '.join(map(str, frame.columns)) or 'none'})",
            where=where,
            fix="name the text column with --text-column",
        )
    if frame.empty:
        raise UserError("the input has no rows", where=where, fix="give it at least one row to predict")
    values = frame[column]
    texts = values.astype(str).str.strip()
    empty = (values.isna() | (texts == "")).to_numpy().nonzero()[0]
    if len(empty):
        rows = ", ".join(str(i + 1) for i in empty[:SHOWN_ROWS])
        more = f" and {len(empty) - SHOWN_ROWS} more" if len(empty) > SHOWN_ROWS else ""
        raise UserError(
            f"{len(empty)} empty text(s) in column {column!r}",
            where=f"{where}, data row(s) {rows}{more} (1 = the first row after any header)",
            fix="remove those rows or fill in their text",
        )
    return values.astype(str).tolist()


def output_names(frame: pd.DataFrame, prefix: str, where: str) -> list[str]:
    """The added columns' names (FIELDS with `prefix`); a UserError if the input already has one of them."""
    names = [prefix + f for f in FIELDS]
    taken = [n for n in names if n in frame.columns]
    if taken:
        raise UserError(
            f"the input already has column(s) {', '.join(taken)}, which the predictions would overwrite",
            where=where,
            fix="pass --prefix (e.g. --prefix pred_) to name the added columns differently",
        )
    return names


def predict_columns(
    predictor: Predictor,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    top_k: int = 3,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list]:
    """`predictor.predict` over `texts` in batches of `batch_size`: one list per field of FIELDS, in text order.

    Args:
        on_batch: called with each batch's row count after it is predicted (a progress bar's `update`).
    """
    columns: dict[str, list] = {f: [] for f in FIELDS}
    for start in range(0, len(texts), batch_size):
        rows = predictor.predict(texts[start : start + batch_size], top_k=top_k)
        for field, values in columns.items():
            values.extend(r[field] for r in rows)
        if on_batch is not None:
            on_batch(len(rows))
    return columns


def with_predictions(
    frame: pd.DataFrame, columns: dict[str, list], names: Sequence[str], fmt: str
) -> pd.DataFrame:
    """The input frame with the prediction columns appended under `names`; `top_k` as JSON text for CSV."""
    added = dict(zip(names, columns.values(), strict=True))
    if fmt == "csv":
        top_k = names[FIELDS.index("top_k")]
        added[top_k] = [json.dumps(v) for v in added[top_k]]
    out = pd.DataFrame(added, index=frame.index)
    return pd.concat([frame, out], axis=1)


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `frame` as CSV, Parquet or JSON lines (by `path`'s extension), atomically, without the index."""
    fmt = table_format(path)
    try:
        with atomic_path(path) as tmp:
            if fmt == "csv":
                frame.to_csv(tmp, index=False)
            elif fmt == "parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    except OSError as err:
        raise UserError(
            f"cannot write the output: {err}", where=str(path), fix="check that its folder is writable"
        ) from err


def predict_file(
    predictor: Predictor | Callable[[], Predictor],
    src: str | os.PathLike,
    dest: str | os.PathLike,
    text_column: str = "text",
    batch_size: int = DEFAULT_BATCH_SIZE,
    top_k: int = 3,
    prefix: str = "",
    progress: bool | None = None,
) -> int:
    """Predict every row of the table `src` and write it, with the prediction columns, to `dest`; returns the rows.

    Args:
        predictor: the Predictor, or a function that loads it: called once the input has been read and checked,
            so that bad input is reported before the model loads.
        progress: a bar of rows on stderr (`timing.progress`): None = only when stderr is a terminal, False = never.
    """
    if batch_size < 1 or top_k < 1:
        raise UserError(
            f"--batch-size and --top-k must be at least 1 (got {batch_size}, {top_k})",
            where="intentops predict",
            fix="pass positive numbers",
        )
    out_fmt = table_format(dest)  # before the work: an unsupported output is refused at once
    frame = read_table(src)
    texts = input_texts(frame, text_column, str(src))
    names = output_names(frame, prefix, str(src))
    if not isinstance(predictor, Predictor):
        predictor = predictor()
    with progress_bar(total=len(texts), desc="predict", unit="row", show=progress) as bar:
        columns = predict_columns(predictor, texts, batch_size, top_k, on_batch=bar.update)
    write_table(with_predictions(frame, columns, names, out_fmt), dest)
    return len(texts)


def production_bundle(registry: Registry) -> Path:
    """A local folder holding the registry's production bundle (fetched and verified if the registry is remote)."""
    version = registry.production()
    if not version:
        raise UserError(
            "no production model yet",
            where=registry.url,
            fix="run `make run` first (its promote stage sets one), or pass --bundle with a bundle folder",
        )
    return registry.fetch(version)

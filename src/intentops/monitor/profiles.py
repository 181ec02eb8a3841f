"""whylogs profiles of monitoring features, written one closed window at a time.

whylogs is imported only through `import_whylogs()`, which first restores the `np.unicode_` alias
that NumPy 2 removed and whylogs 1.6.4 still uses (whylogs issue 1600).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pandas as pd

from intentops.errors import UserError
from intentops.monitor.features import CATEGORICAL_FEATURES, build_vocab, utterance_features

if TYPE_CHECKING:
    from whylogs.core import DatasetProfileView

log = logging.getLogger(__name__)

WINDOW_GLOB = "window-*.bin"
# The reference profile's dataset and creation time: fixed, so the same val and model give the same file.
REFERENCE_TIME = datetime(2000, 1, 1, tzinfo=UTC)
# Reference-profile metadata key (and vocab.json key) holding `performance.reference_stats` of val.
PERFORMANCE_KEY = "performance"


def import_whylogs() -> ModuleType:
    """Import whylogs after aliasing `np.unicode_` (removed in NumPy 2) to `np.str_`, with its telemetry off."""
    import os

    import numpy as np

    # whylogs reports usage to its vendor unless told not to; profiles of customer traffic stay here.
    os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")
    if "unicode_" not in np.__dict__:
        np.unicode_ = np.str_
    import whylogs

    return whylogs


def check_no_text(df: pd.DataFrame) -> None:
    """Refuse a frame with a string column other than CATEGORICAL_FEATURES: it could hold raw text."""
    for col in df.columns:
        if col not in CATEGORICAL_FEATURES and not pd.api.types.is_numeric_dtype(df[col]):
            raise ValueError(
                f"column {col!r} ({df[col].dtype}) is not numeric: profiles take features, never raw text "
                "(use intentops.monitor.features.utterance_features)"
            )


def profile_frame(df: pd.DataFrame) -> DatasetProfileView:
    """Profile a frame of features (see `check_no_text`) with whylogs' standard metrics."""
    check_no_text(df)
    return import_whylogs().log(pandas=df).view()


def reference_profile(
    vocab_texts: Sequence[str],
    reference_texts: Sequence[str],
    vocab_min_count: int,
    predictions: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[frozenset[str], DatasetProfileView]:
    """The training vocabulary and the reference profile.

    The vocabulary comes from the training texts and the reference features from held-out texts:
    profiling the training texts against their own vocabulary would make every live OOV rate look
    like drift.

    Args:
        vocab_texts: training texts.
        reference_texts: held-out texts (the validation split).
        vocab_min_count: see `build_vocab`.
        predictions: the model's outputs on `reference_texts`, once there is a model.
    """
    vocab = build_vocab(vocab_texts, vocab_min_count)
    return vocab, profile_frame(utterance_features(reference_texts, vocab, predictions))


def with_metadata(
    view: DatasetProfileView, metadata: Mapping[str, str], timestamp: datetime | None = None
) -> DatasetProfileView:
    """The same profile with whylogs dataset metadata (string pairs that travel inside the serialized file) and,
    given `timestamp`, that dataset and creation time instead of the clock's, and without whylogs' random trace id."""
    import_whylogs()
    from whylogs.core import DatasetProfileView

    merged = {**(view.metadata or {}), **metadata}
    if timestamp is not None:  # and no per-profile random id: the same columns give the same file
        merged.pop("whylabs.traceId", None)
        merged["whylogs.creationTimestamp"] = str(int(timestamp.timestamp() * 1000))
    return DatasetProfileView(
        columns=view.get_columns(),
        dataset_timestamp=timestamp or view.dataset_timestamp,
        creation_timestamp=timestamp or view.creation_timestamp,
        metadata=merged,
    )


def performance_reference(view: DatasetProfileView) -> dict[str, Any] | None:
    """The val measurements `performance.estimate` needs, stored in the reference profile; None in older ones."""
    import json

    raw = (view.metadata or {}).get(PERFORMANCE_KEY)
    return json.loads(raw) if raw else None


def reference_predictions(bundle_dir: str, texts: Sequence[str]) -> list[dict[str, Any]]:
    """The model's outputs on `texts` through the one Predictor, as serving computes them (top-2 for the margin)."""
    from intentops.inference.predictor import Predictor

    return Predictor.load(bundle_dir).predict(list(texts), top_k=2)


def write_reference(
    train_path: str,
    val_path: str,
    vocab_path: str,
    reference_path: str,
    vocab_min_count: int,
    bundle_dir: str | None = None,
) -> DatasetProfileView:
    """Build the vocabulary and reference profile from the split's parquet files and write both atomically.

    With `bundle_dir` (the model that serving runs), the profile also holds the model's outputs on the
    validation texts, so live predicted intents, confidences and margins are compared like for like, and
    (when val has labels) the val measurements of the label-free accuracy estimate (`performance.py`) go into
    the profile's metadata and vocab.json (which serving replicas read) under PERFORMANCE_KEY.
    """
    import json

    from intentops.io import write_json

    frames = {}
    for name, path in (("train", train_path), ("val", val_path)):
        if not Path(path).is_file():
            raise UserError(f"{name} split not found", where=str(path), fix="run `dvc repro split` first")
        frames[name] = pd.read_parquet(path)
    texts = {name: df["text"].astype(str).tolist() for name, df in frames.items()}
    predictions = reference_predictions(bundle_dir, texts["val"]) if bundle_dir else None
    vocab, view = reference_profile(texts["train"], texts["val"], vocab_min_count, predictions)
    vocab_doc: dict[str, Any] = {"min_count": vocab_min_count, "tokens": sorted(vocab)}
    metadata = {}
    if predictions is not None and "label" in frames["val"]:
        stats = val_performance(predictions, frames["val"]["label"].astype(str).tolist())
        metadata[PERFORMANCE_KEY] = json.dumps(stats)
        vocab_doc[PERFORMANCE_KEY] = stats
    # A DVC output: the reference is of val, not of a moment, so it carries a fixed time (REFERENCE_TIME).
    view = with_metadata(view, metadata, REFERENCE_TIME)
    write_json(vocab_path, vocab_doc)
    fs, root = url_to_fs(reference_path)
    put_atomic(fs, root, view.serialize())
    return view


def val_performance(predictions: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """`performance.reference_stats` of the model's val outputs against the val labels."""
    from intentops.monitor.performance import reference_stats

    return reference_stats(
        [float(p["confidence"]) for p in predictions],
        [p.get("reason") for p in predictions],
        [p["intent"] == y for p, y in zip(predictions, labels, strict=True)],
    )


def read_performance_stats(path: str) -> dict[str, Any] | None:
    """The val measurements stored in vocab.json by `write_reference`; None when absent or unreadable."""
    import json

    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return json.loads(fh.read()).get(PERFORMANCE_KEY)
    except (OSError, ValueError) as err:
        log.warning(
            "no val accuracy statistics in %s (%s): estimated accuracy is plain mean confidence", path, err
        )
        return None


def read_vocab(path: str) -> frozenset[str]:
    """The vocabulary written by `write_reference`: a file, or an fsspec URL (a cluster's object store)."""
    import json

    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return frozenset(json.loads(fh.read())["tokens"])
    except FileNotFoundError as err:
        raise UserError(
            "training vocabulary not found",
            where=str(path),
            fix="run `intentops drift-reference`; on a cluster, copy data/monitoring/vocab.json to object storage "
            "and set $INTENTOPS_VOCAB_URL",
        ) from err


def read_view(data: bytes, where: str) -> DatasetProfileView:
    """Deserialize a whylogs binary profile; a corrupt file is a UserError naming it."""
    import_whylogs()
    from whylogs.core import DatasetProfileView

    try:
        return DatasetProfileView.deserialize(data)
    except Exception as err:  # whylogs raises assorted protobuf/decode errors
        raise UserError(
            f"not a readable whylogs profile ({type(err).__name__}: {err})",
            where=where,
            fix="delete or move the file; a window is only ever written whole, so it was not written by intentops",
        ) from err


def url_to_fs(base_path: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path or URL."""
    from fsspec.core import url_to_fs as fsspec_url_to_fs

    return fsspec_url_to_fs(str(base_path), **(storage_options or {}))


def put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write `data` at `path` whole or not at all.

    A local file goes through a temporary sibling and a rename (its folder is created as needed);
    an object store's single PUT is already atomic, so it is written directly.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        from intentops.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        fs.pipe_file(path, data)


class ProfileWindowWriter:
    """Accumulate feature rows into whylogs profiles and write each closed window to `base_path`.

    A window closes when it holds `max_rows` rows or when a row arrives `max_seconds` or more after
    the window opened (`roll_if_due()` closes an idle one). Each closed window is written at once,
    atomically, as `window-<utc start>-<seq>-<writer id>.bin`; the writer id keeps replicas and
    restarts from overwriting each other. Rows of the open window live only in memory: call
    `flush()` on shutdown (or use the writer as a context manager).

    Each window carries whylogs metadata: `start`, `end` (ISO UTC), `rows`, and the `metadata` rows were logged
    with (serving passes model_version and variant). Rows with other metadata close the open window first, so a
    window (and its estimated accuracy) belongs to one model.

    Args:
        base_path: a folder or fsspec URL (s3://bucket/profiles).
        max_rows: rows per window.
        max_seconds: seconds per window.
        clock: seconds since the epoch; injectable for tests.
        writer_id: defaults to a random 8-hex-digit token.
        storage_options: passed to fsspec.
        on_close: called with (path, view) after each window is written (serving sets a metric from it).
    """

    def __init__(
        self,
        base_path: str,
        *,
        max_rows: int = 1000,
        max_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        writer_id: str | None = None,
        storage_options: dict[str, Any] | None = None,
        on_close: Callable[[str, DatasetProfileView], None] | None = None,
    ):
        if max_rows < 1 or max_seconds <= 0:
            raise ValueError(f"max_rows must be >= 1 and max_seconds > 0, got {max_rows}, {max_seconds}")
        self.fs, self.root = url_to_fs(base_path, storage_options)
        self.max_rows, self.max_seconds, self.clock = max_rows, float(max_seconds), clock
        self.writer_id = writer_id or secrets.token_hex(4)
        self._seq = 0
        self._lock = threading.Lock()
        self._profile: Any = None
        self._rows = 0
        self._start = 0.0
        self._metadata: dict[str, str] = {}
        self.on_close = on_close

    def log(self, features: pd.DataFrame, metadata: Mapping[str, str] | None = None) -> list[str]:
        """Add feature rows (produced under `metadata`); returns the paths of the windows this call closed."""
        check_no_text(features)
        meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
        written: list[str] = []
        with self._lock:
            if self._profile is not None and len(features) and meta != self._metadata:
                written.append(self._close())
            pos = 0
            while pos < len(features):
                now = self.clock()
                if self._profile is not None and now - self._start >= self.max_seconds:
                    written.append(self._close())
                if self._profile is None:
                    self._open(now, meta)
                take = min(self.max_rows - self._rows, len(features) - pos)
                self._profile.track(pandas=features.iloc[pos : pos + take])
                self._rows += take
                pos += take
                if self._rows >= self.max_rows:
                    written.append(self._close())
        return written

    def roll_if_due(self) -> str | None:
        """Close the open window if its time is up (for a periodic timer); returns its path."""
        with self._lock:
            if self._profile is not None and self.clock() - self._start >= self.max_seconds:
                return self._close()
        return None

    def flush(self) -> str | None:
        """Close the open window now, whatever its size; returns its path (None when it was empty)."""
        with self._lock:
            return self._close() if self._profile is not None else None

    def __enter__(self) -> ProfileWindowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def _open(self, now: float, metadata: dict[str, str]) -> None:
        import_whylogs()
        from whylogs.core import DatasetProfile

        self._profile = DatasetProfile(dataset_timestamp=datetime.fromtimestamp(now, UTC))
        self._rows, self._start, self._metadata = 0, now, metadata

    def _close(self) -> str:
        start_dt = datetime.fromtimestamp(self._start, UTC)
        start = start_dt.strftime("%Y%m%dT%H%M%S%fZ")
        path = f"{self.root.rstrip('/')}/window-{start}-{self._seq:06d}-{self.writer_id}.bin"
        end = datetime.fromtimestamp(max(self.clock(), self._start), UTC)
        times = {"start": start_dt.isoformat(), "end": end.isoformat(), "rows": str(self._rows)}
        view = with_metadata(self._profile.view(), {**self._metadata, **times})
        put_atomic(self.fs, path, view.serialize())
        log.info("wrote profile window %s (%d rows)", path, self._rows)
        self._seq += 1
        self._profile, self._rows = None, 0
        if self.on_close is not None:
            try:
                self.on_close(path, view)
            except Exception as err:  # a metric hook must not lose the next window
                log.error("profile window hook failed: %s", err)
        return path


def list_windows(base_path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Closed window files under `base_path`, oldest first (their names start with the UTC start)."""
    fs, root = url_to_fs(base_path, storage_options)
    paths = fs.glob(f"{root.rstrip('/')}/{WINDOW_GLOB}")
    return sorted(paths, key=lambda p: p.rsplit("/", 1)[-1])


def load_windows(
    base_path: str, last_n: int, storage_options: dict[str, Any] | None = None
) -> tuple[DatasetProfileView, list[str]]:
    """Merge the latest `last_n` closed windows into one profile.

    Returns:
        (merged profile, the window paths merged, oldest first)
    """
    windows = read_windows(base_path, last_n, storage_options)
    merged = with_metadata(
        windows[0][1], {}
    )  # whylogs' merge updates the metadata of the view it is called on
    for _, view in windows[1:]:
        merged = merged.merge(view)
    return merged, [p for p, _ in windows]


def read_windows(
    base_path: str, last_n: int, storage_options: dict[str, Any] | None = None
) -> list[tuple[str, DatasetProfileView]]:
    """(path, profile) of the latest `last_n` closed windows, oldest first; none is a UserError."""
    fs, _ = url_to_fs(base_path, storage_options)
    paths = list_windows(base_path, storage_options)[-last_n:] if last_n > 0 else []
    if not paths:
        raise UserError(
            "no closed profile windows to check",
            where=str(base_path),
            fix="point --profiles at the folder the serving app writes windows to, or wait for a window to close",
        )
    return [(p, read_view(fs.cat_file(p), p)) for p in paths]


def window_info(path: str, view: DatasetProfileView) -> dict[str, Any]:
    """A window's path, start, end, model_version and variant from its metadata (windows before them: start from
    the profile's timestamp, the rest None)."""
    meta = view.metadata or {}
    ts = view.dataset_timestamp
    return {
        "window": path,
        "start": meta.get("start") or (ts.isoformat() if ts else None),
        "end": meta.get("end"),
        "model_version": meta.get("model_version"),
        "variant": meta.get("variant"),
    }

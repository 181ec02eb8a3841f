"""whylogs profile windows: rolling by count and time, restart safety, and no raw text on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from intentops.errors import UserError
from intentops.monitor.drift import row_count
from intentops.monitor.features import build_vocab, utterance_features
from intentops.monitor.profiles import (
    ProfileWindowWriter,
    import_whylogs,
    list_windows,
    load_windows,
    profile_frame,
    read_view,
)


def rows(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {"length_chars": np.arange(start, start + n, dtype="int64"), "confidence": np.full(n, 0.5)}
    )


def window_rows(path: str) -> int:
    return row_count(read_view(Path(path).read_bytes(), path))


def test_import_whylogs_restores_numpy_alias():
    why = import_whylogs()
    assert np.unicode_ is np.str_
    assert why.__version__ == "1.6.4"


def test_profile_frame_refuses_text_columns():
    with pytest.raises(ValueError, match="never raw text"):
        profile_frame(pd.DataFrame({"text": ["my card is lost"], "length_chars": [15]}))


def test_windows_roll_by_count_and_flush(tmp_path):
    writer = ProfileWindowWriter(str(tmp_path), max_rows=10, max_seconds=3600, writer_id="w1")
    closed = writer.log(rows(25))
    assert len(closed) == 2
    assert writer.flush() is not None
    assert writer.flush() is None  # nothing open any more
    paths = list_windows(str(tmp_path))
    assert [window_rows(p) for p in paths] == [10, 10, 5]
    assert [Path(p).name.split("-")[2] for p in paths] == ["000000", "000001", "000002"]
    merged, used = load_windows(str(tmp_path), last_n=2)
    assert used == paths[1:] and row_count(merged) == 15


def test_windows_roll_by_time(tmp_path):
    now = [1_700_000_000.0]
    writer = ProfileWindowWriter(str(tmp_path), max_rows=1000, max_seconds=60, clock=lambda: now[0])
    assert writer.log(rows(3)) == []
    now[0] += 30
    assert writer.log(rows(2)) == []
    now[0] += 31  # 61 s after the window opened: the next row starts a new window
    (closed,) = writer.log(rows(4))
    assert window_rows(closed) == 5
    assert Path(closed).name.startswith("window-20231114T221320")  # the UTC start of the window
    assert writer.roll_if_due() is None
    now[0] += 60
    assert window_rows(writer.roll_if_due()) == 4


def test_load_windows_without_windows_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no closed profile windows"):
        load_windows(str(tmp_path), last_n=3)


def test_profiles_never_contain_raw_text(tmp_path):
    sentinel = "Quixotic zebrafish 7734 refund for Mrs Featherstonehaugh"
    texts = [sentinel, "my card is lost", "when will my card arrive"] * 20
    vocab = build_vocab(texts[1:3], min_count=1)
    preds = [{"intent": "card_arrival", "confidence": 0.7}] * len(texts)
    with ProfileWindowWriter(str(tmp_path), max_rows=25) as writer:
        writer.log(utterance_features(texts, vocab, preds))
    files = list_windows(str(tmp_path))
    assert len(files) == 3
    blob = b"".join(Path(p).read_bytes() for p in files)
    for needle in (sentinel, "Quixotic", "zebrafish", "Featherstonehaugh", "my card is lost"):
        assert needle.encode() not in blob and needle.lower().encode() not in blob
    assert b"card_arrival" in blob  # the predicted intent is a feature, and it is there


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pandas as pd
    from intentops.monitor.profiles import ProfileWindowWriter

    writer = ProfileWindowWriter(sys.argv[1], max_rows=5, writer_id="crashy")
    i = 0
    while True:  # runs until killed, with a window always half full
        writer.log(pd.DataFrame({"length_chars": np.array([i], dtype="int64")}))
        i += 1
        time.sleep(0.002)
    """
)


def test_closed_windows_survive_a_killed_writer_and_a_restart(tmp_path):
    base = tmp_path / "profiles"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(base)])
    try:
        deadline = time.monotonic() + 60
        while len(list(base.glob("window-*.bin"))) < 4:
            assert proc.poll() is None, "writer died on its own"
            assert time.monotonic() < deadline, "writer wrote no windows in 60 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p: Path(p).read_bytes() for p in list_windows(str(base))}
    # Every closed window is whole: 5 rows each, readable. The open one died with the process.
    assert all(window_rows(p) == 5 for p in before)
    assert all(p.name.startswith(("window-", ".")) for p in base.iterdir())

    # A half-written file from a crash mid-write would sit in a hidden temporary folder: never loaded.
    junk = base / ".window-x.bin.tmp"
    junk.mkdir()
    (junk / "window-x.bin").write_bytes(b"\x00half")

    with ProfileWindowWriter(str(base), max_rows=5) as restarted:
        restarted.log(rows(7))
    after = list_windows(str(base))
    assert len(after) == len(before) + 2
    assert {p: Path(p).read_bytes() for p in before} == before  # nothing overwritten
    merged, used = load_windows(str(base), last_n=len(after))
    assert row_count(merged) == 5 * len(before) + 7

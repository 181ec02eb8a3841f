"""`intentops predict` on a tiny real ONNX bundle: every row and column kept in each table format, the
Predictor's fields added as it returns them, and bad input refused with a what/where/fix error and no output."""

from __future__ import annotations

import csv
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from intentops.cli import main
from intentops.inference.predictor import Predictor
from support import write_tiny_onnx_bundle

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]
FIELDS = ["intent", "confidence", "out_of_scope", "reason", "needs_review", "top_k"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The near-uniform tiny bundle, with a review threshold between its confidences so `reason` varies."""
    from intentops.inference import bundle as layout
    from intentops.io import write_json

    dest = tmp_path_factory.mktemp("batch") / "bundle"
    write_tiny_onnx_bundle(dest, LABELS, confident=False)
    confidence = [r["confidence"] for r in Predictor.load(dest).predict(table()["utterance"].tolist())]
    review = {"min_confidence": float(np.median(confidence)), "min_margin": 0.0}
    write_json(dest / layout.CALIBRATION_FILE, {"temperature": 1.0, "ood": {}, "review": review})
    layout.seal(dest)
    return dest


def table() -> pd.DataFrame:
    """Input rows with columns around the text one, values a type-guessing reader would change ("007", "NA")."""
    texts = ["my card has not arrived", "i lost my card", "what is the exchange rate", "top up failed again"]
    n = 7
    return pd.DataFrame(
        {
            "id": [f"{i:03d}" for i in range(n)],
            "utterance": [texts[i % len(texts)] for i in range(n)],
            "note": ["NA", "", "x, y", 'say "hi"', "ü", "7", "last"],
        }
    )


def write(frame: pd.DataFrame, path: Path) -> Path:
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path, index=False),
    }.get(path.suffix, lambda: frame.to_json(path, orient="records", lines=True, force_ascii=False))()
    return path


def read_rows(path: Path) -> list[dict]:
    """The written rows as plain values: CSV as text (top_k decoded from its JSON), the others as stored."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return [{**r, "top_k": json.loads(r["top_k"])} for r in csv.DictReader(fh)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_written(row: dict, ext: str) -> dict:
    """A Predictor.predict row as a file of type `ext` holds it (CSV: text, None as "")."""
    if ext != ".csv":
        return row
    return {k: v if k == "top_k" else "" if v is None else str(v) for k, v in row.items()}


def predict(*args: str) -> None:
    main(["predict", *map(str, args)])


@pytest.mark.parametrize(
    "src_ext, dest_ext",
    [(".csv", ".csv"), (".parquet", ".parquet"), (".jsonl", ".jsonl"), (".csv", ".jsonl")],
)
def test_every_row_and_column_is_kept_and_the_predictor_fields_added(bundle, tmp_path, src_ext, dest_ext):
    src = write(table(), tmp_path / f"in{src_ext}")
    dest = tmp_path / "out" / f"pred{dest_ext}"
    predict(
        src, "-o", dest, "--bundle", bundle, "--text-column", "utterance", "--batch-size", "3", "--top-k", "2"
    )

    rows = read_rows(dest)
    assert [list(r) for r in rows] == [[*table().columns, *FIELDS]] * len(table())
    assert [{c: r[c] for c in table().columns} for r in rows] == table().to_dict("records")
    expected = Predictor.load(bundle).predict(table()["utterance"].tolist(), top_k=2)
    assert {r["reason"] for r in expected} == {None, "low_confidence"}  # both kinds of row are written
    for got, want in zip(rows, expected, strict=True):
        want = as_written(want, dest_ext)
        assert {f: got[f] for f in FIELDS if f not in ("confidence", "top_k")} == {
            f: want[f] for f in FIELDS if f not in ("confidence", "top_k")
        }
        assert float(got["confidence"]) == pytest.approx(float(want["confidence"]))
        assert [t["intent"] for t in got["top_k"]] == [t["intent"] for t in want["top_k"]]
        assert [t["confidence"] for t in got["top_k"]] == pytest.approx(
            [t["confidence"] for t in want["top_k"]]
        )
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary file left beside it


def test_a_missing_text_column_is_a_user_error_and_writes_nothing(bundle, tmp_path, capsys):
    src = write(table(), tmp_path / "in.csv")
    dest = tmp_path / "pred.csv"
    with pytest.raises(SystemExit) as exit_info:
        predict(src, "-o", dest, "--bundle", bundle)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "utterance" in err and str(src) in err and "--text-column" in err
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["in.csv"]


def test_empty_texts_are_named_by_row(bundle, tmp_path, capsys):
    frame = table()
    frame.loc[[2, 5], "utterance"] = ["", "   "]
    src = write(frame, tmp_path / "in.csv")
    with pytest.raises(SystemExit) as exit_info:
        predict(src, "-o", tmp_path / "pred.csv", "--bundle", bundle, "--text-column", "utterance")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "2 empty text(s)" in err and "row(s) 3, 6" in err and "fix:" in err


@pytest.mark.parametrize("src_name, dest_name", [("in.xlsx", "pred.csv"), ("in.csv", "pred.txt")])
def test_an_unsupported_extension_is_refused(bundle, tmp_path, capsys, src_name, dest_name):
    src = tmp_path / src_name
    src.write_text("text\nhello\n")
    with pytest.raises(SystemExit) as exit_info:
        predict(src, "-o", tmp_path / dest_name, "--bundle", bundle)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "cannot tell the table format" in err and ".parquet" in err
    assert not (tmp_path / dest_name).exists()


def test_an_unreadable_file_is_a_user_error(bundle, tmp_path, capsys):
    src = tmp_path / "in.parquet"
    src.write_text("this is not parquet")
    with pytest.raises(SystemExit):
        predict(src, "-o", tmp_path / "pred.csv", "--bundle", bundle)
    assert "cannot read the input as parquet" in capsys.readouterr().err


def test_no_production_model_says_run_make_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INTENTOPS_REGISTRY_URL", str(tmp_path / "registry"))
    src = write(table(), tmp_path / "in.csv")
    with pytest.raises(SystemExit):
        predict(src, "-o", tmp_path / "pred.csv", "--text-column", "utterance")
    err = capsys.readouterr().err
    assert "no production model yet" in err and "make run" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"intentops {version('intentops')}"

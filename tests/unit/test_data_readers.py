"""Readers and sources: each kind of bad file gets an error naming the file, the row and the fix."""

import socket

import pytest

from intentops.data.readers import (
    match_key,
    normalise_text,
    read_clinc_json,
    read_csv_rows,
    read_feedback,
    read_taxonomy,
)
from intentops.data.sources import FileSpec, fetch_bytes, resolve_location, verify_sha256
from intentops.errors import UserError


def read(data: bytes):
    return read_csv_rows(data, "dir/train.csv", "train", "text", "category")


def test_csv_reads_quoted_newlines_and_records_source_rows():
    df = read(b'text,category\r\n"line one\nline two",a\r\nplain,b\r\n')
    assert df["text"].tolist() == ["line one line two", "plain"]
    assert df["source_id"].tolist() == ["train.csv:3", "train.csv:4"]
    assert set(df["origin_split"]) == {"train"}


def test_normalisation():
    assert normalise_text("  Hello\n  there\t") == "Hello there"
    assert match_key("HeLLo   There ") == match_key("hello there")


@pytest.mark.parametrize(
    "data, message, where",
    [
        (b"words,category\r\nhi,a\r\n", "missing column(s) ['text']", "dir/train.csv:1"),
        (b"text,category\r\nok,a\r\ncaf\xe9,b\r\n", "not valid UTF-8 at line 3", "dir/train.csv:3"),
        (b'text,category\r\n"unclosed,a\r\nnext,b\r\n', "broken CSV quoting", "dir/train.csv"),
        (b'text,category\r\n"a"b,c\r\n', "broken CSV quoting", "dir/train.csv:2"),
        (b"text,category\r\na,b,c\r\n", "row has 3 fields", "dir/train.csv:2"),
        (b"text,category\r\n", "no rows", "dir/train.csv"),
    ],
)
def test_csv_errors_name_the_problem_and_the_row(data, message, where):
    with pytest.raises(UserError) as err:
        read(data)
    assert message in err.value.what
    assert err.value.where.startswith(where)
    assert err.value.fix


def test_clinc_json_keeps_splits():
    df = read_clinc_json(
        b'{"train": [["hi", "greet"]], "oos_test": [["weather?", "oos"]]}', "x/data_full.json"
    )
    assert df[["origin_split", "label"]].values.tolist() == [["train", "greet"], ["oos_test", "oos"]]


def test_taxonomy_formats_and_errors():
    assert read_taxonomy(b'["a", "b"]', "t.json") == ["a", "b"]
    assert read_taxonomy(b"a\nb\n", "t.txt") == ["a", "b"]
    with pytest.raises(UserError, match="twice"):
        read_taxonomy(b'["a", "a"]', "t.json")


def test_sha256_and_empty_checks():
    with pytest.raises(UserError, match="empty"):
        verify_sha256(b"", None, "f", "train")
    with pytest.raises(UserError, match="sha256 mismatch for 'train'"):
        verify_sha256(b"abc", "0" * 64, "f", "train")
    assert verify_sha256(b"abc", None, "f", "train").startswith("ba7816bf")


def test_location_precedence():
    spec = FileSpec(key="train", file="train.csv", url="https://example.invalid/train.csv")
    assert resolve_location(spec, "banking77", None) == spec.url
    assert resolve_location(spec, "banking77", "s3://bucket/m/") == "s3://bucket/m/banking77/train.csv"
    assert resolve_location(FileSpec(key="train", path="/x.csv", file="t"), "b", "/m") == "/x.csv"


def test_missing_file_and_unreachable_url(tmp_path):
    with pytest.raises(UserError, match="not found") as err:
        fetch_bytes(str(tmp_path / "nope.csv"))
    assert "nope.csv" in err.value.where
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot download after 1 attempts") as err:
        fetch_bytes(f"http://127.0.0.1:{port}/train.csv", timeout_s=2, retries=1)
    assert "INTENTOPS_DATA_MIRROR" in err.value.fix


def test_fsspec_memory_url():
    import fsspec

    with fsspec.open("memory://mirror/banking77/train.csv", "wb") as fh:
        fh.write(b"text,category\r\nhi,a\r\n")
    assert fetch_bytes("memory://mirror/banking77/train.csv").startswith(b"text")


BOM = b"\xef\xbb\xbf"


def test_a_leading_bom_is_dropped_by_every_reader():
    assert read(BOM + b"text,category\r\nhi,a\r\n")[["text", "label"]].values.tolist() == [["hi", "a"]]
    clinc = read_clinc_json(BOM + b'{"train": [["hi", "greet"]]}', "x/data_full.json")
    assert clinc["text"].tolist() == ["hi"]
    rows, _ = read_feedback(BOM + b"text,label,prediction_id\r\nhi,card_arrival,p1\r\n", "data/labels.csv")
    assert rows["label"].tolist() == ["card_arrival"]
    assert read_taxonomy(BOM + b'["a", "b"]', "t.json") == ["a", "b"]


def test_crlf_file_with_nbsp_and_format_characters_reads():
    data = 'text,category\r\n"two\r\nlines",a\r\ntop\u00a0up,b\r\n\U0001f469\u200d\U0001f4bb,c\r\n'.encode()
    df = read(data)
    # accepted; normalisation (unchanged) makes the NBSP a plain space, as any whitespace run
    assert df["text"].tolist() == ["two lines", "top up", "\U0001f469\u200d\U0001f4bb"]
    assert df["source_id"].tolist() == ["train.csv:3", "train.csv:4", "train.csv:5"]


@pytest.mark.parametrize(
    ("data", "message", "where"),
    [
        (
            b"text,category\r\nok,a\r\nbad\x00text,b\r\n",
            "the text holds a control character U+0000 (NUL) at position 3",
            "dir/train.csv:3",
        ),
        (
            b'text,category\r\n"two\r\nlines\x1b[2J",a\r\n',
            "the text holds a control character U+001B (ESC)",
            "dir/train.csv:3",
        ),
        (
            "text,category\r\nnext\x85line,a\r\n".encode(),
            "control character U+0085 (NEL) at position 4",
            "dir/train.csv:2",
        ),
        (
            b"text,category\r\nok,card\x7f\r\n",
            "the label holds a control character U+007F (DEL)",
            "dir/train.csv:2",
        ),
        # A lone surrogate cannot be UTF-8: the decoder names the line.
        (
            b"text,category\r\nok,a\r\ncard \xed\xa0\x80 lost,b\r\n",
            "not valid UTF-8 at line 3",
            "dir/train.csv:3",
        ),
    ],
)
def test_a_bad_character_fails_naming_file_line(data, message, where):
    with pytest.raises(UserError) as err:
        read(data)
    assert message in err.value.what
    assert err.value.where == where
    assert "UTF-8" in err.value.fix


def test_clinc_json_lone_surrogate_names_split_and_index():
    data = b'{"train": [["hi", "greet"], ["card \\ud800 lost", "lost_card"]]}'
    with pytest.raises(UserError) as err:
        read_clinc_json(data, "x/data_full.json")
    assert err.value.what == "the text holds a lone surrogate U+D800 at position 5"
    assert err.value.where == "x/data_full.json: train[1]"


def test_feedback_labels_and_taxonomy_follow_the_text_rules():
    with pytest.raises(UserError) as err:
        read_feedback(b"text,label\r\nhi,card_arrival\r\nhello,new:x\x1b\r\n", "data/labels.csv")
    assert "the label holds a control character U+001B (ESC)" in err.value.what
    assert err.value.where == "data/labels.csv:3"
    with pytest.raises(UserError, match="taxonomy label 2 holds a control character U\\+0000"):
        read_taxonomy(b'["a", "b\\u0000"]', "t.json")

"""`rlhfzoo.data.jsonl`: reading JSONL files and checking row fields, with actionable errors."""

import gzip
import json
from pathlib import Path

import pytest

from rlhfzoo.data.jsonl import DataError, check_fields, read_jsonl

HERE = Path(__file__).parent


def test_reads_rows_with_line_numbers_and_skips_blank_lines():
    rows = list(read_jsonl(HERE / "hh_small.jsonl"))
    assert [n for n, _ in rows] == list(range(1, 10))
    assert all(isinstance(r, dict) and "chosen" in r for _, r in rows)


def test_blank_lines_keep_line_numbers_and_bom_is_ignored(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_bad_json_names_file_and_line():
    with pytest.raises(DataError) as e:
        list(read_jsonl(HERE / "hh_bad_json.jsonl"))
    msg = str(e.value)
    assert "hh_bad_json.jsonl, line 3" in msg and "invalid JSON" in msg and "fix or delete" in msg
    assert e.value.line == 3 and e.value.source.endswith("hh_bad_json.jsonl")
    assert isinstance(e.value, ValueError)


def test_non_utf8_names_file_and_line_and_suggests_reencoding():
    with pytest.raises(DataError, match=r"hh_latin1\.jsonl, line 2: not valid UTF-8.*iconv"):
        list(read_jsonl(HERE / "hh_latin1.jsonl"))


def test_json_array_file_gets_a_hint(tmp_path):
    p = tmp_path / "array.jsonl"
    p.write_text(json.dumps([{"chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match=r"line 1: expected a JSON object .* array.*one object per line"):
        list(read_jsonl(p))


def test_non_object_row(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"a": 1}\n"just a string"\n')
    with pytest.raises(DataError, match=r"s\.jsonl, line 2: expected a JSON object .* string"):
        list(read_jsonl(p))


def test_gzip_is_detected_from_content(tmp_path):
    rows = [{"i": i, "t": "é"} for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    for name in ("rows.jsonl.gz", "misnamed.jsonl"):
        p = tmp_path / name
        p.write_bytes(gzip.compress(data))
        assert [r for _, r in read_jsonl(p)] == rows


def test_truncated_gzip_is_a_data_error(tmp_path):
    data = "".join(json.dumps({"i": i, "pad": "x" * 50}) + "\n" for i in range(200)).encode()
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(data)[:-40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip stream is damaged"):
        list(read_jsonl(p))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_missing_file_or_a_directory_is_a_data_error(tmp_path):
    """A user error (the command line prints it, exit 2), still a FileNotFoundError for callers."""
    for path, what in ((tmp_path / "nope.jsonl", "not found"), (tmp_path, "is a directory")):
        with pytest.raises(DataError, match=what) as e:
            list(read_jsonl(path))
        assert isinstance(e.value, FileNotFoundError) and e.value.source == str(path)


# ---------------------------------------------------------------------------- check_fields


def test_check_fields_accepts_a_good_row():
    check_fields({"chosen": "a", "rejected": "b"}, ("chosen", "rejected"), where="f, line 1")


def test_check_fields_missing():
    with pytest.raises(DataError, match=r"f\.jsonl, line 4: missing field 'rejected' \(the row has 'chosen'\)"):
        check_fields({"chosen": "a"}, ("chosen", "rejected"), where="f.jsonl, line 4")


def test_check_fields_extra_is_an_error_unless_allowed():
    row = {"chosen": "a", "rejected": "b", "id": 3}
    with pytest.raises(DataError, match=r"line 2: unexpected field 'id'"):
        check_fields(row, ("chosen", "rejected"), where="f, line 2")
    check_fields(row, ("chosen", "rejected"), allow_extra=True)
    check_fields(row, ("chosen", "rejected"), allow_extra=("id",))
    check_fields(row, ("chosen", "rejected"), optional=("id",))


def test_check_fields_empty_and_non_string():
    with pytest.raises(DataError, match=r"f, line 7: field 'rejected' is empty"):
        check_fields({"chosen": "a", "rejected": "  \n"}, ("chosen", "rejected"), where="f, line 7")
    with pytest.raises(DataError, match=r"field 'chosen' must be a string but is a number"):
        check_fields({"chosen": 1, "rejected": "b"}, ("chosen", "rejected"))
    with pytest.raises(DataError, match=r"field 'chosen' must be a string but is a null"):
        check_fields({"chosen": None, "rejected": "b"}, ("chosen", "rejected"))

"""Reading JSON Lines files (`.jsonl`, `.jsonl.gz`) with errors a user can act on.

    for line, row in read_jsonl("pairs.jsonl.gz"):
        check_fields(row, required=("chosen", "rejected"), where=f"pairs.jsonl.gz, line {line}")

Every problem with the file's contents -- bytes that are not UTF-8, a line that is not valid JSON,
a row that is not a JSON object, a missing, unexpected or empty field, a damaged gzip stream --
is raised as a `DataError` whose message names the file and the line and says how to fix it; a
missing file is a `DataFileNotFoundError` (a `DataError` and a `FileNotFoundError`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rlhfzoo.errors import UserError

__all__ = ["DataError", "DataFileNotFoundError", "read_jsonl", "check_fields", "is_gzip"]

GZIP_MAGIC = b"\x1f\x8b"


class DataError(UserError, ValueError):
    """A problem with the contents of a data file or dataset, meant to be shown to the user.

    `source` names the file (or dataset) and `line` the 1-based line or row, where known.
    """

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        super().__init__(message)
        self.source = source
        self.line = line


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist; the message names it and the ways to provide one."""


def is_gzip(path: str | Path) -> bool:
    """Whether a file is gzip-compressed, judged by its first bytes (not its name)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _where(source: str, line: int) -> str:
    return f"{source}, line {line}"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, row)` for every non-blank line of a JSONL file; line numbers are 1-based.

    The file may be plain or gzip-compressed (detected from its content, so a misnamed file still
    reads). A UTF-8 byte-order mark at the start is ignored, and so are blank lines. Raises
    `DataFileNotFoundError` if the file does not exist and `DataError` for any problem with its
    contents.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        what = "is a directory, not a data file" if path.is_dir() else "not found"
        raise DataFileNotFoundError(f"data file {what}: {source}. Give the path of a .jsonl or .jsonl.gz file.", source)
    opener = gzip.open if is_gzip(path) else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                row = _parse_line(raw, source, line_no)
                if row is not None:
                    yield line_no, row
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{source}: the gzip stream is damaged after line {line_no} ({type(e).__name__}: {e}). "
            "The file was probably cut short while copying or downloading; copy it again, or "
            "decompress what is readable with `gzip -dc` and fix the end by hand.",
            source,
            line_no + 1,
        ) from e


def _parse_line(raw: bytes, source: str, line_no: int) -> dict[str, Any] | None:
    """Decode and parse one line; None for a blank line."""
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise DataError(
            f"{_where(source, line_no)}: not valid UTF-8 (byte {bad[:1]!r} at byte offset {e.start} of the "
            f"line). JSONL files must be UTF-8; re-encode the file, e.g. "
            f"`iconv -f latin1 -t utf-8 in.jsonl > out.jsonl` if it is Latin-1.",
            source,
            line_no,
        ) from e
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{_where(source, line_no)}: invalid JSON ({e.msg} at column {e.colno}). Each line of a "
            "JSONL file must be one complete JSON object, e.g. {\"chosen\": \"...\", \"rejected\": \"...\"}; "
            "fix or delete this line.",
            source,
            line_no,
        ) from e
    if not isinstance(row, dict):
        hint = (
            " The file looks like one JSON array; write one object per line instead (JSON Lines)."
            if isinstance(row, list) and line_no == 1
            else " Write one JSON object per line."
        )
        raise DataError(
            f"{_where(source, line_no)}: expected a JSON object ({{...}}) but found a {_json_type(row)}.{hint}",
            source,
            line_no,
        )
    return row


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def check_fields(
    row: Mapping[str, Any],
    required: Iterable[str],
    *,
    optional: Iterable[str] = (),
    allow_extra: bool | Collection[str] = False,
    text_fields: Iterable[str] | None = None,
    where: str = "row",
    source: str | None = None,
    line: int | None = None,
) -> None:
    """Check one row's fields; raise `DataError` naming `where` (e.g. "file.jsonl, line 3") if wrong.

    - every name in `required` must be present;
    - a field that is neither required nor optional is an error unless `allow_extra` is true
      (or a collection holding its name);
    - every name in `text_fields` (default: the required fields) must be a non-empty string when
      present (whitespace-only counts as empty).
    """
    required = tuple(required)
    known = set(required) | set(optional)
    missing = [k for k in required if k not in row]
    if missing:
        raise DataError(
            f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(the row has {', '.join(map(repr, row)) or 'no fields'}). Every row needs "
            f"{', '.join(map(repr, required))}; rename the columns or fix the row.",
            source,
            line,
        )
    if allow_extra is not True:
        allowed = known | (set(allow_extra) if allow_extra else set())
        extra = [k for k in row if k not in allowed]
        if extra:
            raise DataError(
                f"{where}: unexpected field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}. "
                f"Allowed fields: {', '.join(map(repr, sorted(allowed)))}; remove the others "
                "(or check the spelling).",
                source,
                line,
            )
    for k in required if text_fields is None else tuple(text_fields):
        if k not in row:
            continue
        value = row[k]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {k!r} must be a string but is a {_json_type(value)}; fix the row.",
                source,
                line,
            )
        if not value.strip():
            raise DataError(
                f"{where}: field {k!r} is empty; fill it in or delete the row.", source, line
            )

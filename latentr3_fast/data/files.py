"""Reading input files; every error is a DataError naming the file and the line.

* :func:`read_text`: a whole UTF-8 file (gzip when the name ends in ``.gz``), for the standard
  layout and RecBole's atomic files.
* :func:`json_records`: JSON-lines records streamed line by line (gzip detected by its magic
  bytes), for the raw Amazon dumps, which can be gigabytes.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["json_records", "read_text", "text_lines"]


def read_text(path: Path) -> str:
    """The file's text, UTF-8 (gzip if ``.gz``); errors name the line of a bad byte."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if not raw.strip():
        raise DataError(f"{path}: empty file (row 0, no header or data)")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # tolerate a UTF-8 BOM
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, byte column {column}: invalid UTF-8 byte 0x{raw[e.start]:02x}"
        ) from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a gzip or plain UTF-8 text file; bad bytes name the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            for line_number, raw in enumerate(f, 1):
                try:
                    yield line_number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: line {line_number}, byte column {e.start + 1}: invalid UTF-8 byte"
                    ) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON-lines file."""
    empty = True
    for line_number, line in text_lines(path):
        if not line.strip():
            continue
        empty = False
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            try:  # the 2014 dumps are Python literals, one per line
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{path}: line {line_number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_number}: not a JSON object")
        yield line_number, record
    if empty:
        raise DataError(f"{path}: empty file")

"""The standard file layout (BIGRec / D³ / LatentR³): reading and writing.

``DIR/{train,valid,test}/NAME.csv`` (or ``.csv.gz``) and ``DIR/info/NAME.txt``
(``title<TAB>item_id`` per line, ids ``0..n-1``). CSV list columns are Python literals, parsed
with ``ast.literal_eval`` (never ``eval``).

Errors name the file, the row (1-based data row; the header is row 0) with its line number, and
the column. Nothing is dropped silently: this loader drops nothing at all, it raises instead.
"""

from __future__ import annotations

import ast
import csv
import io
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import read_text
from .records import ItemCatalog, RecDataset, Sample, category_from_name

__all__ = [
    "COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "load_dataset",
    "load_standard",
    "read_info",
    "read_split",
    "find_split_file",
    "write_standard",
]

SPLITS = ("train", "valid", "test")
COLUMNS = (
    "user_id",
    "item_asins",
    "item_asin",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
)
# What a Sample needs; the other columns may be absent or placeholders (rebuilt train files).
REQUIRED_COLUMNS = ("history_item_id", "item_id", "history_item_title", "item_title")
# Present but unused list columns are still checked to be well-formed literals.
_CHECKED_LIST_COLUMNS = ("item_asins", "history_rating", "history_timestamp")


def read_info(path: str | os.PathLike) -> list[str]:
    """Titles by id from ``info/NAME.txt`` (``title<TAB>id`` lines; ids must be 0..n-1)."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    titles: list[str | None] = [None] * len(lines)
    for line_number, line in enumerate(lines, 1):
        where = f"{path}: line {line_number}, column item_id"
        title, tab, id_text = line.rstrip("\r").rpartition("\t")
        if not tab:
            raise DataError(f"{where}: expected 'title<TAB>item_id'")
        try:
            item_id = int(id_text)
        except ValueError:
            raise DataError(f"{where}: {id_text!r} is not an integer") from None
        if not 0 <= item_id < len(lines):
            raise DataError(
                f"{where}: id {item_id} outside 0..{len(lines) - 1} "
                f"(ids must be 0..n-1, one line each)"
            )
        if titles[item_id] is not None:
            raise DataError(f"{where}: duplicate id {item_id}")
        titles[item_id] = title
    return titles  # type: ignore[return-value]  # every slot filled: n distinct ids in 0..n-1


def find_split_file(root: Path, split: str, name: str) -> Path:
    """``root/split/name.csv`` or ``.csv.gz``; DataError naming both when neither exists."""
    for extension in (".csv", ".csv.gz"):
        path = root / split / f"{name}{extension}"
        if path.is_file():
            return path
    raise DataError(f"{root / split / name}.csv[.gz]: missing {split} split file")


# Fast paths that accept only strings ast.literal_eval parses to the same value (checked in
# tests/data); anything else goes through ast.literal_eval itself. Int lists are 5x faster this
# way, and the unused columns (asins, ratings, timestamps) need only a validity check.
# [0-9], not \d: \d also matches non-ASCII digits ('٣'), which int() reads but
# ast.literal_eval rejects.
_INT_LIST = re.compile(r"\[(?:-?[0-9]+(?:, ?-?[0-9]+)*)?\]\Z")
_NUM = r"(?:-?[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?|None)"
_STR = r"'[^'\\\n]*'"
_TRIVIAL_LIST = re.compile(rf"\[(?:{_NUM}(?:, ?{_NUM})*|{_STR}(?:, ?{_STR})*)?\]\Z")


# A list of single-quoted strings with no quote, backslash or newline inside: the separator
# "', '" can then only occur between elements, so splitting on it is exact.
_PLAIN_STR_LIST = re.compile(r"\['[^'\\\n]*'(?:, '[^'\\\n]*')*\]\Z")


def parse_str_list(text: str) -> Any:
    """``ast.literal_eval(text)``, with a fast path for ``['a', 'b c']`` (no escapes)."""
    if _PLAIN_STR_LIST.match(text):
        return text[2:-2].split("', '")
    return ast.literal_eval(text)


def parse_int_list(text: str) -> Any:
    """``ast.literal_eval(text)``, with a fast path for plain ``[1, 2, 3]``."""
    if _INT_LIST.match(text):
        body = text[1:-1]
        return [int(x) for x in body.split(",")] if body.strip() else []
    return ast.literal_eval(text)


# What ast.literal_eval (and the fast paths) raise on a malformed literal.
_LITERAL_ERRORS = (ValueError, SyntaxError, MemoryError, RecursionError, TypeError)


class _Literal:
    """``ast.literal_eval`` with a cache: list columns repeat a lot (``[None, None]``, ...)."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def __call__(self, text: str) -> Any:
        value = self.cache.get(text)
        if value is None:
            value = ast.literal_eval(text)
            if len(self.cache) < 100_000:
                self.cache[text] = value
        return value


class _BadCell(Exception):
    """A cell that fails a check; :func:`read_split` adds the file, row and line."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


@dataclass(frozen=True)
class _ColumnIndex:
    """Positions of the columns a Sample is built from, and of the checked-only list columns."""

    history_ids: int
    history_titles: int
    target_id: int
    target_title: int
    user: int | None
    checked: tuple[tuple[str, int], ...]
    width: int


def _column_index(path: Path, header: list[str]) -> _ColumnIndex:
    """Finds the columns by name in the header row; DataError when a required one is missing."""
    position = {name.strip(): k for k, name in enumerate(header)}
    missing = [c for c in REQUIRED_COLUMNS if c not in position]
    if missing:
        raise DataError(f"{path}: row 0 (header): missing column(s) {', '.join(missing)}")
    return _ColumnIndex(
        history_ids=position["history_item_id"],
        history_titles=position["history_item_title"],
        target_id=position["item_id"],
        target_title=position["item_title"],
        user=position.get("user_id"),
        checked=tuple((c, position[c]) for c in _CHECKED_LIST_COLUMNS if c in position),
        width=len(header),
    )


def _typed_list(
    cell: str, column: str, parse: Callable[[str], Any], element: type, plural: str
) -> list | tuple:
    """The list literal in ``cell``, every element of type ``element``."""
    try:
        values = parse(cell)
    except _LITERAL_ERRORS:
        raise _BadCell(column, f"malformed list literal {cell[:80]!r}") from None
    if not isinstance(values, list | tuple) or not all(type(x) is element for x in values):
        raise _BadCell(column, f"expected a list of {plural}, got {cell[:80]!r}")
    return values


def _check_item_id(item_id: int, column: str, num_items: int) -> None:
    if not 0 <= item_id < num_items:
        raise _BadCell(column, f"item id {item_id} not in the info file (ids 0..{num_items - 1})")


def _history(row: list[str], columns: _ColumnIndex, num_items: int) -> tuple[list, list]:
    """The row's history item ids and titles, checked against each other and the catalogue."""
    history_ids = _typed_list(
        row[columns.history_ids], "history_item_id", parse_int_list, int, "integers"
    )
    if not history_ids:
        raise _BadCell("history_item_id", "empty history")
    for item_id in history_ids:
        _check_item_id(item_id, "history_item_id", num_items)
    cell = row[columns.history_titles]
    history_titles = _typed_list(cell, "history_item_title", parse_str_list, str, "strings")
    if len(history_titles) != len(history_ids):
        raise _BadCell(
            "history_item_title", f"{len(history_titles)} titles for {len(history_ids)} history ids"
        )
    if "\\" in cell:  # only an escape ('\\ud800') can make a lone surrogate
        for title in history_titles:
            try:
                title.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _BadCell(
                    "history_item_title",
                    f"title {title[:40]!r} is not valid text ({e.reason} at {e.start})",
                ) from None
    return history_ids, history_titles


def _check_unused_lists(row: list[str], columns: _ColumnIndex, literal: _Literal) -> None:
    """Present but unused list columns must still hold list literals (or be empty/None)."""
    for column, k in columns.checked:
        cell = row[k]
        if cell and cell != "None" and not _TRIVIAL_LIST.match(cell):
            try:
                value = literal(cell)
            except _LITERAL_ERRORS:
                raise _BadCell(column, f"malformed list literal {cell[:80]!r}") from None
            if not isinstance(value, list | tuple):
                raise _BadCell(column, f"expected a list literal, got {cell[:80]!r}")


def _parse_row(row: list[str], columns: _ColumnIndex, num_items: int, literal: _Literal) -> Sample:
    """One data row as a Sample; checks run in column order history, target, unused lists."""
    if len(row) != columns.width:
        raise _BadCell("-", f"{len(row)} fields, header has {columns.width}")
    history_ids, history_titles = _history(row, columns, num_items)
    try:
        target_id = int(row[columns.target_id])
    except ValueError:
        raise _BadCell("item_id", f"{row[columns.target_id]!r} is not an integer") from None
    _check_item_id(target_id, "item_id", num_items)
    _check_unused_lists(row, columns, literal)
    user = row[columns.user] if columns.user is not None and row[columns.user] else None
    return Sample(
        tuple(history_ids), tuple(history_titles), target_id, row[columns.target_title], user
    )


def read_split(path: str | os.PathLike, num_items: int) -> list[Sample]:
    """Samples of one split CSV; raises DataError naming file, row and column on bad input."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise DataError(f"{path}: row 0 (header): cannot parse header ({e})") from None
    columns = _column_index(path, header)
    literal = _Literal()
    samples: list[Sample] = []
    row_number = 0
    blank = 0
    try:
        for row in reader:
            if not row:  # csv yields [] for a blank line: skip it, counted in a warning
                blank += 1
                continue
            row_number += 1
            try:
                samples.append(_parse_row(row, columns, num_items, literal))
            except _BadCell as bad:
                raise DataError(
                    f"{path}: row {row_number} (line {reader.line_num}), "
                    f"column {bad.column}: {bad.message}"
                ) from None
    except csv.Error as e:
        raise DataError(
            f"{path}: row {row_number + 1} (line {reader.line_num}): CSV error: {e}"
        ) from e
    if blank:
        warnings.warn(f"{path}: skipped {blank} blank line(s)", stacklevel=2)
    if not samples:
        warnings.warn(f"{path}: no data rows (header only)", stacklevel=2)
    return samples


def _dataset_name(root: Path, name: str | None) -> str:
    info = root / "info"
    if name is not None:
        return name
    if not info.is_dir():
        raise DataError(f"{info}: missing info directory (expected {info}/NAME.txt)")
    names = sorted(p.name[: -len(".txt")] for p in info.iterdir() if p.name.endswith(".txt"))
    if not names:
        raise DataError(f"{info}: no NAME.txt info file")
    if len(names) > 1:
        raise DataError(f"{info}: several info files {names}; pass name=")
    return names[0]


def load_standard(
    root: str | os.PathLike, category: str | None = None, name: str | None = None
) -> RecDataset:
    """Load the standard layout under ``root`` (NAME found from ``root/info/*.txt``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected DIR/{{train,valid,test,info}})")
    name = _dataset_name(root, name)
    titles = read_info(root / "info" / f"{name}.txt")
    splits = {}
    for split in SPLITS:
        splits[split] = read_split(find_split_file(root, split, name), len(titles))
    # The CSV's titles are used as they are (they are what the reference trains on); say so
    # when they disagree with the info file, since the catalogue trie uses the info titles.
    mismatched = sum(
        s.target_title != titles[s.target_id] for rows in splits.values() for s in rows
    )
    if mismatched:
        warnings.warn(
            f"{root}: {mismatched} target titles differ from info/{name}.txt for the same id",
            stacklevel=2,
        )
    return RecDataset(
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        items=ItemCatalog(titles),
        category=category or category_from_name(name),
        name=name,
    )


def load_dataset(
    path: str | os.PathLike, category: str | None = None, *, name: str | None = None
) -> RecDataset:
    """Load a dataset.

    ``path`` is one of:
      * a directory in the standard layout (``DIR/{train,valid,test}/NAME.csv[.gz]`` +
        ``DIR/info/NAME.txt``; ``name`` picks NAME when ``info/`` holds several),
      * ``"recbole:DIR/NAME"``: RecBole atomic files ``DIR/NAME.inter`` + ``DIR/NAME.item``,
      * ``"synthetic"`` (or ``"synthetic:SEED"``): the built-in synthetic catalogue.

    ``category`` defaults to the name without its ``_<k>_<window>`` suffix
    (``CDs_and_Vinyl_5_2015-10-2018-11`` -> ``CDs_and_Vinyl``).
    """
    spec = os.fspath(path)
    if spec.startswith("recbole:"):
        from .recbole import load_recbole

        stem = Path(spec[len("recbole:") :])
        return load_recbole(stem.parent, stem.name, category=category)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from .synthetic import make_synthetic

        seed = spec.partition(":")[2]
        try:
            dataset = make_synthetic(seed=int(seed) if seed else 0)
        except ValueError:
            raise DataError(f"{spec!r}: expected 'synthetic' or 'synthetic:<int seed>'") from None
        if category:
            dataset.category = category
        return dataset
    return load_standard(spec, category=category, name=name)


def _cell(value: Any) -> Any:
    """A CSV cell: lists and tuples as Python list literals (``repr``), as the reference does."""
    return repr(list(value)) if isinstance(value, list | tuple) else value


def write_standard(
    root: str | os.PathLike,
    name: str,
    titles: Sequence[str],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
) -> Path:
    """Write the standard layout. ``splits[split]`` rows are dicts with the keys of COLUMNS;
    list values are written as Python list literals (``repr``), as the reference does."""
    root = Path(root)
    for title in titles:
        if "\t" in title or "\n" in title or "\r" in title:
            raise DataError(
                f"title {title!r} contains a tab or newline; info/{name}.txt cannot hold it"
            )
    (root / "info").mkdir(parents=True, exist_ok=True)
    with open(root / "info" / f"{name}.txt", "w", encoding="utf-8", newline="\n") as f:
        for item_id, title in enumerate(titles):
            f.write(f"{title}\t{item_id}\n")
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(COLUMNS)
            for row in splits.get(split, ()):
                writer.writerow([_cell(row[column]) for column in COLUMNS])
    return root

"""RecBole atomic files -> RecDataset, samples built as for the paper's datasets (App. A).

``DIR/NAME.inter``: tab-separated, header ``field:type`` (``user_id:token``, ``item_id:token``,
``timestamp:float``, other fields ignored). ``DIR/NAME.item``: ``item_id:token`` and a title
field (``title``, or any field whose name ends in ``title``, e.g. ``movie_title:token_seq``).

Per user, interactions are sorted by time (stable); every position i >= 1 yields a sample with the
previous <= 10 items; all samples are sorted by target timestamp (stable) and split at
``int(0.8 n)`` / ``int(0.9 n)``: a global temporal split (the paper's), not RecBole's
leave-one-out. Item ids are 0..n-1 in order of first appearance in ``.item`` among the items
that occur in ``.inter``; ``dataset.items.tokens[i]`` is item i's RecBole ``item_id`` token.
Interactions whose item has no title are dropped with a warning that counts them.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from ..errors import DataError
from .files import read_text
from .records import ItemCatalog, RecDataset
from .samples import sequences_to_samples, temporal_split

__all__ = ["load_recbole"]


def _fields(path: Path, header: str) -> dict[str, int]:
    """Map of field name (without ``:type``) -> column index."""
    positions = {}
    for k, field in enumerate(header.rstrip("\r").split("\t")):
        positions[field.split(":", 1)[0].strip()] = k
    if not positions:
        raise DataError(f"{path}: line 1 (header): no fields")
    return positions


def _title_field(path: Path, fields: dict[str, int]) -> str:
    """``title``, else the first field whose name ends in ``title``."""
    if "title" in fields:
        return "title"
    candidates = [f for f in fields if f.endswith("title")]
    if not candidates:
        raise DataError(f"{path}: line 1 (header): missing column title (no '*title' field)")
    return candidates[0]


def _read_items(item_path: Path) -> dict[str, str]:
    """Item token -> title (whitespace collapsed), in file order; untitled items are skipped."""
    lines = read_text(item_path).split("\n")
    fields = _fields(item_path, lines[0])
    if "item_id" not in fields:
        raise DataError(f"{item_path}: line 1 (header): missing column item_id")
    title_field = _title_field(item_path, fields)
    id_column, title_column = fields["item_id"], fields[title_field]
    width = max(id_column, title_column) + 1
    title_of: dict[str, str] = {}
    no_title = 0
    for line_number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < width:
            raise DataError(
                f"{item_path}: line {line_number}, column {title_field}: "
                f"{len(parts)} fields, need {width}"
            )
        token, title = parts[id_column], " ".join(parts[title_column].split())
        if not title:
            no_title += 1
            continue
        if token in title_of:
            raise DataError(
                f"{item_path}: line {line_number}, column item_id: duplicate item {token!r}"
            )
        title_of[token] = title
    if no_title:
        warnings.warn(f"{item_path}: {no_title} item(s) with an empty title", stacklevel=3)
    return title_of


def _timestamp(inter_path: Path, line_number: int, cell: str) -> float:
    """The cell as a finite float (a NaN key would make the temporal sort order arbitrary)."""
    try:
        timestamp = float(cell)
    except ValueError:
        raise DataError(
            f"{inter_path}: line {line_number}, column timestamp: {cell!r} is not a number"
        ) from None
    if not math.isfinite(timestamp):
        raise DataError(
            f"{inter_path}: line {line_number}, column timestamp: {cell!r} is not finite"
        )
    return timestamp


def _read_interactions(
    inter_path: Path, title_of: dict[str, str], item_file: str
) -> dict[str, list[tuple[float, str]]]:
    """User token -> ``(timestamp, item token)`` in file order, for the items with a title."""
    lines = read_text(inter_path).split("\n")
    fields = _fields(inter_path, lines[0])
    for column in ("user_id", "item_id", "timestamp"):
        if column not in fields:
            raise DataError(f"{inter_path}: line 1 (header): missing column {column}")
    user_column, item_column = fields["user_id"], fields["item_id"]
    time_column = fields["timestamp"]
    width = max(user_column, item_column, time_column) + 1
    by_user: dict[str, list[tuple[float, str]]] = {}
    dropped = 0
    blank = 0
    for line_number, line in enumerate(lines[1:], 2):
        if not line.strip():
            blank += 1
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < width:
            raise DataError(
                f"{inter_path}: line {line_number}, column -: {len(parts)} fields, need {width}"
            )
        timestamp = _timestamp(inter_path, line_number, parts[time_column])
        token = parts[item_column]
        if token not in title_of:
            dropped += 1
            continue
        by_user.setdefault(parts[user_column], []).append((timestamp, token))
    if blank > 1 or (blank == 1 and lines[-1] != ""):
        warnings.warn(f"{inter_path}: skipped {blank} blank line(s)", stacklevel=3)
    if dropped:
        warnings.warn(
            f"{inter_path}: dropped {dropped} interaction(s) whose item has no title in "
            f"{item_file}",
            stacklevel=3,
        )
    if not by_user:
        raise DataError(f"{inter_path}: no usable interactions")
    return by_user


def load_recbole(
    directory: str | os.PathLike, name: str, category: str | None = None
) -> RecDataset:
    """Reads ``directory/name.inter`` and ``directory/name.item`` into a :class:`RecDataset`."""
    directory = Path(directory)
    inter_path, item_path = directory / f"{name}.inter", directory / f"{name}.item"
    title_of = _read_items(item_path)
    by_user = _read_interactions(inter_path, title_of, item_path.name)
    used = {token for events in by_user.values() for _, token in events}
    kept = [token for token in title_of if token in used]  # .item order
    new_id = {token: k for k, token in enumerate(kept)}
    titles = [title_of[token] for token in kept]
    sequences = {
        user: [(timestamp, new_id[token]) for timestamp, token in events]
        for user, events in by_user.items()
    }
    train, valid, test = temporal_split(sequences_to_samples(sequences, titles))
    return RecDataset(
        train=train,
        valid=valid,
        test=test,
        items=ItemCatalog(titles, tokens=kept),
        category=category or name,
        name=name,
    )

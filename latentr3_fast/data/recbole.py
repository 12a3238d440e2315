"""RecBole atomic files -> RecDataset with SPEC section 1's sample construction.

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
from .layout import _read_text
from .records import ItemCatalog, RecDataset
from .samples import sequences_to_samples, temporal_split

__all__ = ["load_recbole"]


def _fields(path: Path, header: str) -> dict[str, int]:
    """Map of field name (without ``:type``) -> column index."""
    out = {}
    for k, f in enumerate(header.rstrip("\r").split("\t")):
        out[f.split(":", 1)[0].strip()] = k
    if not out:
        raise DataError(f"{path}: line 1 (header): no fields")
    return out


def _title_field(path: Path, fields: dict[str, int]) -> str:
    if "title" in fields:
        return "title"
    cands = [f for f in fields if f.endswith("title")]
    if not cands:
        raise DataError(f"{path}: line 1 (header): missing column title (no '*title' field)")
    return cands[0]


def load_recbole(
    directory: str | os.PathLike, name: str, category: str | None = None
) -> RecDataset:
    """Read ``directory/name.inter`` and ``directory/name.item`` into a :class:`RecDataset`."""
    directory = Path(directory)
    inter_path, item_path = directory / f"{name}.inter", directory / f"{name}.item"

    # ---- items -----------------------------------------------------------------------------
    lines = _read_text(item_path).split("\n")
    fields = _fields(item_path, lines[0])
    if "item_id" not in fields:
        raise DataError(f"{item_path}: line 1 (header): missing column item_id")
    tf = _title_field(item_path, fields)
    k_id, k_t = fields["item_id"], fields[tf]
    width = max(k_id, k_t) + 1
    title_of: dict[str, str] = {}
    order: list[str] = []
    no_title = 0
    for ln, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < width:
            raise DataError(
                f"{item_path}: line {ln}, column {tf}: {len(parts)} fields, need {width}"
            )
        iid, title = parts[k_id], " ".join(parts[k_t].split())
        if not title:
            no_title += 1
            continue
        if iid in title_of:
            raise DataError(f"{item_path}: line {ln}, column item_id: duplicate item {iid!r}")
        title_of[iid] = title
        order.append(iid)
    if no_title:
        warnings.warn(f"{item_path}: {no_title} item(s) with an empty title", stacklevel=2)

    # ---- interactions ----------------------------------------------------------------------
    lines = _read_text(inter_path).split("\n")
    fields = _fields(inter_path, lines[0])
    for c in ("user_id", "item_id", "timestamp"):
        if c not in fields:
            raise DataError(f"{inter_path}: line 1 (header): missing column {c}")
    k_u, k_i, k_ts = fields["user_id"], fields["item_id"], fields["timestamp"]
    width = max(k_u, k_i, k_ts) + 1
    raw: dict[str, list[tuple[float, str]]] = {}
    used: set[str] = set()
    dropped = 0
    blank = 0
    for ln, line in enumerate(lines[1:], 2):
        if not line.strip():
            blank += 1
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < width:
            raise DataError(f"{inter_path}: line {ln}, column -: {len(parts)} fields, need {width}")
        try:
            ts = float(parts[k_ts])
        except ValueError:
            raise DataError(
                f"{inter_path}: line {ln}, column timestamp: {parts[k_ts]!r} is not a number"
            ) from None
        if not math.isfinite(ts):  # a NaN key makes the temporal sort order arbitrary
            raise DataError(
                f"{inter_path}: line {ln}, column timestamp: {parts[k_ts]!r} is not finite"
            )
        iid = parts[k_i]
        if iid not in title_of:
            dropped += 1
            continue
        raw.setdefault(parts[k_u], []).append((ts, iid))
        used.add(iid)
    if blank > 1 or (blank == 1 and lines[-1] != ""):
        warnings.warn(f"{inter_path}: skipped {blank} blank line(s)", stacklevel=2)
    if dropped:
        warnings.warn(
            f"{inter_path}: dropped {dropped} interaction(s) whose item has no title in "
            f"{item_path.name}",
            stacklevel=2,
        )
    if not raw:
        raise DataError(f"{inter_path}: no usable interactions")

    kept = [iid for iid in order if iid in used]
    new_id = {iid: k for k, iid in enumerate(kept)}
    titles = [title_of[iid] for iid in kept]
    seqs = {u: [(ts, new_id[i]) for ts, i in v] for u, v in raw.items()}
    train, valid, test = temporal_split(sequences_to_samples(seqs, titles))
    return RecDataset(
        train=train,
        valid=valid,
        test=test,
        items=ItemCatalog(titles, tokens=kept),
        category=category or name,
        name=name,
    )

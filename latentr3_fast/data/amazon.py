"""Raw Amazon-2018 preprocessing (SPEC section 1, paper App. A) into the standard layout.

    python -m latentr3_fast.data.amazon --reviews CDs_and_Vinyl_5.json.gz \\
        --meta meta_CDs_and_Vinyl.json.gz --out data/CDs [--start 2017-10 --min-items 5000]

Steps: (1) keep reviews in [start, end) (end defaults to 2018-11, exclusive: month start);
(2) clean titles (unescape ``&quot;``/``&amp;``, strip spaces then ``"``) and drop items with no
title, a title of length <= 1, containing ``<span id`` or of more than 20 words; (3) iterated
k-core (k = 5) on users and items until stable; (4) fewer than ``min_items`` items left: move
``start`` back 3 months and redo; (5) per user, sort by time (stable); each position i >= 1 is a
sample with the previous <= 10 items; (6) stable sort of all samples by target time, split at
``int(0.8 n)`` / ``int(0.9 n)``; (7) item ids from a ``random.Random(42)`` shuffle of the sorted
asins.

Choices the SPEC leaves open (documented here): users are visited in sorted id order (as a
pandas groupby does), which orders samples with equal timestamps; tabs and newlines inside a
kept title become spaces (the info file is ``title<TAB>id`` per line); the window edges are UTC
month starts. Input files are JSON lines, gzip or plain (older dumps' Python-literal lines are
accepted too).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import logging
import os
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DataError
from .layout import write_standard
from .samples import MAX_HISTORY, temporal_split

__all__ = ["clean_title", "preprocess_amazon", "PreprocessReport", "main"]

log = logging.getLogger(__name__)


# ---- input ---------------------------------------------------------------------------------
def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a gzip or plain UTF-8 text file; bad bytes name the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fb:
        magic = fb.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            for ln, raw in enumerate(f, 1):
                try:
                    yield ln, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: line {ln}, byte column {e.start + 1}: invalid UTF-8 byte"
                    ) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    empty = True
    for ln, line in _open_lines(path):
        if not line.strip():
            continue
        empty = False
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            try:  # the 2014 dumps are Python literals, one per line
                rec = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{path}: line {ln}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {ln}: not a JSON object")
        yield ln, rec
    if empty:
        raise DataError(f"{path}: empty file")


def clean_title(title: Any) -> str | None:
    """SPEC step 2: the cleaned title, or None when the item must be dropped."""
    if not isinstance(title, str):
        return None
    t = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(t) <= 1 or "<span id" in t or len(t.split(" ")) > 20:
        return None
    return t


def _month(s: str) -> datetime:
    m = re.fullmatch(r"(\d{4})-(\d{1,2})", s.strip())
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise DataError(f"{s!r}: expected a month as YYYY-MM")
    return datetime(int(m.group(1)), int(m.group(2)), 1, tzinfo=timezone.utc)


def _minus_months(d: datetime, n: int) -> datetime:
    k = d.year * 12 + (d.month - 1) - n
    return datetime(k // 12, k % 12 + 1, 1, tzinfo=timezone.utc)


# ---- steps ---------------------------------------------------------------------------------
def k_core(reviews: list[tuple], k: int) -> list[tuple]:
    """Iterate: drop reviews of users or items with < k reviews, until nothing changes.

    ``reviews`` rows are ``(user, asin, ...)``. Repeated (user, item) reviews each count.
    """
    while True:
        uc = Counter(r[0] for r in reviews)
        ic = Counter(r[1] for r in reviews)
        kept = [r for r in reviews if uc[r[0]] >= k and ic[r[1]] >= k]
        if len(kept) == len(reviews):
            return kept
        reviews = kept


@dataclass
class PreprocessReport:
    """What :func:`preprocess_amazon` did."""

    path: Path
    name: str
    start: str
    end: str
    num_items: int
    num_users: int
    num_reviews: int
    rows: dict[str, int]
    attempts: list[tuple[str, int]] = field(default_factory=list)  # (start, items after k-core)


def preprocess_amazon(
    reviews: str | os.PathLike,
    meta: str | os.PathLike,
    out: str | os.PathLike,
    start: str = "2017-10",
    end: str = "2018-11",
    min_items: int = 5000,
    k: int = 5,
    seed: int = 42,
    category: str | None = None,
    name: str | None = None,
) -> PreprocessReport:
    """Run SPEC section 1's preprocessing and write ``out/{train,valid,test,info}``."""
    reviews, meta, out = Path(reviews), Path(meta), Path(out)
    t_start, t_end = _month(start), _month(end)
    if t_start >= t_end:
        raise DataError(f"--start {start} must be before --end {end}")
    if category is None:
        category = re.sub(r"(_\d+)?\.json(\.gz)?$|\.gz$", "", reviews.name)

    titles: dict[str, str] = {}
    dropped_titles = 0
    for ln, rec in _records(meta):
        if "asin" not in rec:
            raise DataError(f"{meta}: line {ln}, column asin: missing")
        t = clean_title(rec.get("title"))
        if t is None:
            dropped_titles += 1
        else:
            titles[str(rec["asin"])] = t  # a repeated asin: the last usable title wins
    if dropped_titles:
        log.info("%s: %d meta records without a usable title", meta, dropped_titles)

    all_reviews: list[tuple[str, str, int, Any]] = []
    for ln, rec in _records(reviews):
        for c in ("reviewerID", "asin", "unixReviewTime"):
            if c not in rec:
                raise DataError(f"{reviews}: line {ln}, column {c}: missing")
        try:
            ts = int(rec["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataError(
                f"{reviews}: line {ln}, column unixReviewTime: {rec['unixReviewTime']!r}"
            ) from None
        all_reviews.append((str(rec["reviewerID"]), str(rec["asin"]), ts, rec.get("overall")))
    earliest = min(r[2] for r in all_reviews)
    no_title = sum(r[1] not in titles for r in all_reviews)
    if no_title:
        warnings.warn(
            f"{reviews}: {no_title} review(s) of items without a usable title are dropped",
            stacklevel=2,
        )

    attempts: list[tuple[str, int]] = []
    lo = t_start
    while True:
        a, b = lo.timestamp(), t_end.timestamp()
        window = [r for r in all_reviews if a <= r[2] < b and r[1] in titles]
        core = k_core(window, k)
        n_items = len({r[1] for r in core})
        attempts.append((f"{lo:%Y-%m}", n_items))
        log.info(
            "window [%s, %s): %d reviews, %d items after %d-core",
            lo,
            t_end,
            len(window),
            n_items,
            k,
        )
        if n_items >= min_items:
            break
        if a <= earliest:
            warnings.warn(
                f"only {n_items} items (< min_items={min_items}) even with start {lo:%Y-%m}, "
                f"before the earliest review; using that",
                stacklevel=2,
            )
            break
        lo = _minus_months(lo, 3)
    if not core:
        raise DataError(f"{reviews}: no reviews left after the window and the {k}-core filter")

    asins = sorted({r[1] for r in core})
    random.Random(seed).shuffle(asins)
    item_id = {a: i for i, a in enumerate(asins)}
    item_titles = [" ".join(re.split(r"[\t\r\n]", titles[a])) for a in asins]

    by_user: dict[str, list[tuple[str, str, int, Any]]] = {}
    for r in core:
        by_user.setdefault(r[0], []).append(r)
    timed: list[tuple[float, dict[str, Any]]] = []
    for user in sorted(by_user):
        seq = sorted(by_user[user], key=lambda r: r[2])
        for pos in range(1, len(seq)):
            hist = seq[max(0, pos - MAX_HISTORY) : pos]
            tgt = seq[pos]
            timed.append(
                (
                    tgt[2],
                    {
                        "user_id": user,
                        "item_asins": [h[1] for h in hist],
                        "item_asin": tgt[1],
                        "history_item_id": [item_id[h[1]] for h in hist],
                        "item_id": item_id[tgt[1]],
                        "history_item_title": [item_titles[item_id[h[1]]] for h in hist],
                        "item_title": item_titles[item_id[tgt[1]]],
                        "history_rating": [h[3] for h in hist],
                        "rating": tgt[3],
                        "history_timestamp": [h[2] for h in hist],
                        "timestamp": tgt[2],
                    },
                )
            )
    train, valid, test = temporal_split(timed)
    if name is None:
        name = f"{category}_{k}_{lo:%Y-%m}-{t_end:%Y-%m}"
    write_standard(out, name, item_titles, {"train": train, "valid": valid, "test": test})
    return PreprocessReport(
        path=out,
        name=name,
        start=f"{lo:%Y-%m}",
        end=f"{t_end:%Y-%m}",
        num_items=len(asins),
        num_users=len(by_user),
        num_reviews=len(core),
        rows={"train": len(train), "valid": len(valid), "test": len(test)},
        attempts=attempts,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m latentr3_fast.data.amazon",
        description="Preprocess raw Amazon-2018 reviews + metadata into the standard layout.",
    )
    p.add_argument("--reviews", required=True, help="<Category>_5.json(.gz), JSON lines")
    p.add_argument("--meta", required=True, help="meta_<Category>.json(.gz), JSON lines")
    p.add_argument("--out", required=True, help="output dir: OUT/{train,valid,test,info}")
    p.add_argument("--start", default="2017-10", help="window start month YYYY-MM (inclusive)")
    p.add_argument("--end", default="2018-11", help="window end month YYYY-MM (exclusive)")
    p.add_argument("--min-items", type=int, default=5000, help="back off 3 months until reached")
    p.add_argument("--k", type=int, default=5, help="k-core threshold")
    p.add_argument("--seed", type=int, default=42, help="seed of the item-id shuffle")
    p.add_argument("--category", default=None, help="default: from the reviews file name")
    p.add_argument("--name", default=None, help="default: <Category>_<k>_<start>-<end>")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        r = preprocess_amazon(
            a.reviews,
            a.meta,
            a.out,
            start=a.start,
            end=a.end,
            min_items=a.min_items,
            k=a.k,
            seed=a.seed,
            category=a.category,
            name=a.name,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {r.path} ({r.name}): window [{r.start}, {r.end}), {r.num_items} items, "
        f"{r.num_users} users, rows train/valid/test = "
        f"{r.rows['train']}/{r.rows['valid']}/{r.rows['test']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

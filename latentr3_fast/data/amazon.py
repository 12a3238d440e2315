"""Raw Amazon-2018 preprocessing (paper Sec. 4.1 and App. A) into the standard layout.

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

Choices the paper leaves open: users are visited in sorted id order (as a pandas groupby in
the reference preprocessing does), which orders samples with equal timestamps; tabs and
newlines inside a kept title become spaces (the info file is ``title<TAB>id`` per line); the
window edges are UTC month starts. Input files are JSON lines, gzip or plain (older dumps'
Python-literal lines are accepted too).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import json_records
from .layout import write_standard
from .samples import temporal_split, user_windows

__all__ = ["clean_title", "preprocess_amazon", "PreprocessReport", "main"]

log = logging.getLogger(__name__)


def clean_title(title: Any) -> str | None:
    """Step 2: the cleaned title, or None when the item must be dropped."""
    if not isinstance(title, str):
        return None
    cleaned = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(cleaned) <= 1 or "<span id" in cleaned or len(cleaned.split(" ")) > 20:
        return None
    return cleaned


def _month(text: str) -> datetime:
    """The UTC start of month ``YYYY-MM``."""
    match = re.fullmatch(r"(\d{4})-(\d{1,2})", text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise DataError(f"{text!r}: expected a month as YYYY-MM")
    return datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=timezone.utc)


def _minus_months(month: datetime, count: int) -> datetime:
    """The month start ``count`` months before ``month``."""
    months = month.year * 12 + (month.month - 1) - count
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=timezone.utc)


# ---- steps ---------------------------------------------------------------------------------
def k_core(reviews: list[tuple], k: int) -> list[tuple]:
    """Iterate: drop reviews of users or items with < k reviews, until nothing changes.

    ``reviews`` rows are ``(user, asin, ...)``. Repeated (user, item) reviews each count.
    """
    while True:
        user_count = Counter(r[0] for r in reviews)
        item_count = Counter(r[1] for r in reviews)
        kept = [r for r in reviews if user_count[r[0]] >= k and item_count[r[1]] >= k]
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


Review = tuple[str, str, int, Any]  # (user, asin, unix time, rating)


def _read_titles(meta: Path) -> dict[str, str]:
    """Step 2: asin -> cleaned title, for the meta records whose title survives ``clean_title``."""
    titles: dict[str, str] = {}
    dropped_titles = 0
    for line_number, record in json_records(meta):
        if "asin" not in record:
            raise DataError(f"{meta}: line {line_number}, column asin: missing")
        title = clean_title(record.get("title"))
        if title is None:
            dropped_titles += 1
        else:
            titles[str(record["asin"])] = title  # a repeated asin: the last usable title wins
    if dropped_titles:
        log.info("%s: %d meta records without a usable title", meta, dropped_titles)
    return titles


def _read_reviews(reviews: Path, titles: dict[str, str]) -> list[Review]:
    """Every review as ``(user, asin, unix time, rating)``; warns about untitled items."""
    all_reviews: list[Review] = []
    for line_number, record in json_records(reviews):
        for column in ("reviewerID", "asin", "unixReviewTime"):
            if column not in record:
                raise DataError(f"{reviews}: line {line_number}, column {column}: missing")
        try:
            timestamp = int(record["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataError(
                f"{reviews}: line {line_number}, column unixReviewTime: "
                f"{record['unixReviewTime']!r}"
            ) from None
        all_reviews.append(
            (str(record["reviewerID"]), str(record["asin"]), timestamp, record.get("overall"))
        )
    no_title = sum(review[1] not in titles for review in all_reviews)
    if no_title:
        warnings.warn(
            f"{reviews}: {no_title} review(s) of items without a usable title are dropped",
            stacklevel=3,
        )
    return all_reviews


def _window_core(
    all_reviews: list[Review],
    titles: dict[str, str],
    window_start: datetime,
    window_end: datetime,
    k: int,
    min_items: int,
) -> tuple[list[Review], datetime, list[tuple[str, int]]]:
    """Steps 1, 3 and 4 (paper App. A): the k-core of the reviews in ``[start, end)``, moving
    ``start`` back 3 months until at least ``min_items`` items remain.

    Returns the k-core reviews, the start month used and one ``(start, items)`` per attempt.
    """
    earliest = min(review[2] for review in all_reviews)
    attempts: list[tuple[str, int]] = []
    start = window_start
    while True:
        low, high = start.timestamp(), window_end.timestamp()
        window = [r for r in all_reviews if low <= r[2] < high and r[1] in titles]
        core = k_core(window, k)
        num_items = len({r[1] for r in core})
        attempts.append((f"{start:%Y-%m}", num_items))
        log.info(
            "window [%s, %s): %d reviews, %d items after %d-core",
            start,
            window_end,
            len(window),
            num_items,
            k,
        )
        if num_items >= min_items:
            return core, start, attempts
        if low <= earliest:
            warnings.warn(
                f"only {num_items} items (< min_items={min_items}) even with start "
                f"{start:%Y-%m}, before the earliest review; using that",
                stacklevel=3,
            )
            return core, start, attempts
        start = _minus_months(start, 3)


def _timed_rows(
    core: list[Review], item_id: dict[str, int], item_titles: list[str]
) -> tuple[list[tuple[float, dict[str, Any]]], int]:
    """Step 5: ``(target time, row)`` for every position >= 1 of every user's time-sorted
    sequence, with the previous <= ``MAX_HISTORY`` items; also the number of users."""
    by_user: dict[str, list[Review]] = {}
    for review in core:
        by_user.setdefault(review[0], []).append(review)
    timed: list[tuple[float, dict[str, Any]]] = []
    for user, history, target in user_windows(by_user, lambda review: review[2]):
        row = {
            "user_id": user,
            "item_asins": [h[1] for h in history],
            "item_asin": target[1],
            "history_item_id": [item_id[h[1]] for h in history],
            "item_id": item_id[target[1]],
            "history_item_title": [item_titles[item_id[h[1]]] for h in history],
            "item_title": item_titles[item_id[target[1]]],
            "history_rating": [h[3] for h in history],
            "rating": target[3],
            "history_timestamp": [h[2] for h in history],
            "timestamp": target[2],
        }
        timed.append((target[2], row))
    return timed, len(by_user)


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
    """Runs the paper's preprocessing (App. A; steps in the module docstring) and writes
    ``out/{train,valid,test,info}``."""
    reviews, meta, out = Path(reviews), Path(meta), Path(out)
    window_start, window_end = _month(start), _month(end)
    if window_start >= window_end:
        raise DataError(f"--start {start} must be before --end {end}")
    if category is None:
        category = re.sub(r"(_\d+)?\.json(\.gz)?$|\.gz$", "", reviews.name)

    titles = _read_titles(meta)
    all_reviews = _read_reviews(reviews, titles)
    core, used_start, attempts = _window_core(
        all_reviews, titles, window_start, window_end, k, min_items
    )
    if not core:
        raise DataError(f"{reviews}: no reviews left after the window and the {k}-core filter")

    # step 7: item ids from a seeded shuffle of the sorted asins
    asins = sorted({review[1] for review in core})
    random.Random(seed).shuffle(asins)
    item_id = {asin: i for i, asin in enumerate(asins)}
    item_titles = [" ".join(re.split(r"[\t\r\n]", titles[asin])) for asin in asins]

    timed, num_users = _timed_rows(core, item_id, item_titles)
    train, valid, test = temporal_split(timed)  # step 6
    if name is None:
        name = f"{category}_{k}_{used_start:%Y-%m}-{window_end:%Y-%m}"
    write_standard(out, name, item_titles, {"train": train, "valid": valid, "test": test})
    return PreprocessReport(
        path=out,
        name=name,
        start=f"{used_start:%Y-%m}",
        end=f"{window_end:%Y-%m}",
        num_items=len(asins),
        num_users=num_users,
        num_reviews=len(core),
        rows={"train": len(train), "valid": len(valid), "test": len(test)},
        attempts=attempts,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m latentr3_fast.data.amazon",
        description="Preprocess raw Amazon-2018 reviews + metadata into the standard layout.",
    )
    parser.add_argument("--reviews", required=True, help="<Category>_5.json(.gz), JSON lines")
    parser.add_argument("--meta", required=True, help="meta_<Category>.json(.gz), JSON lines")
    parser.add_argument("--out", required=True, help="output dir: OUT/{train,valid,test,info}")
    parser.add_argument("--start", default="2017-10", help="window start month YYYY-MM (inclusive)")
    parser.add_argument("--end", default="2018-11", help="window end month YYYY-MM (exclusive)")
    parser.add_argument(
        "--min-items", type=int, default=5000, help="back off 3 months until reached"
    )
    parser.add_argument("--k", type=int, default=5, help="k-core threshold")
    parser.add_argument("--seed", type=int, default=42, help="seed of the item-id shuffle")
    parser.add_argument("--category", default=None, help="default: from the reviews file name")
    parser.add_argument("--name", default=None, help="default: <Category>_<k>_<start>-<end>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = preprocess_amazon(
            args.reviews,
            args.meta,
            args.out,
            start=args.start,
            end=args.end,
            min_items=args.min_items,
            k=args.k,
            seed=args.seed,
            category=args.category,
            name=args.name,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.path} ({report.name}): window [{report.start}, {report.end}), "
        f"{report.num_items} items, "
        f"{report.num_users} users, rows train/valid/test = "
        f"{report.rows['train']}/{report.rows['valid']}/{report.rows['test']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

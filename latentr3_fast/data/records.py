"""Core data records: one sample, the item catalogue and a whole dataset (three splits).

Every loader (standard CSV layout, RecBole atomic files, raw Amazon dumps, the synthetic
catalogue) returns a :class:`RecDataset`, so nothing downstream depends on where data came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

__all__ = [
    "Sample",
    "ItemCatalog",
    "RecDataset",
    "category_word",
    "category_from_name",
]


@dataclass(frozen=True)
class Sample:
    """One next-item example: up to 10 previous items (oldest first) and the next item."""

    history_ids: tuple[int, ...]
    history_titles: tuple[str, ...]
    target_id: int
    target_title: str
    user_id: str | None = None


class ItemCatalog:
    """Item id -> title, and title -> every id with that title (titles are not unique).

    ``titles[i]`` is the title of item ``i``; ids are ``0..len(titles)-1``. ``tokens[i]``
    (optional) is the item's id in the source data, e.g. RecBole's ``item_id`` token.
    """

    def __init__(self, titles: Iterable[str], tokens: Iterable[str] | None = None) -> None:
        self.titles: list[str] = list(titles)
        self.ids_by_title: dict[str, list[int]] = {}
        for i, t in enumerate(self.titles):
            self.ids_by_title.setdefault(t, []).append(i)
        self.tokens: list[str] | None = None if tokens is None else [str(t) for t in tokens]
        self.id_by_token: dict[str, int] = {}
        if self.tokens is not None:
            if len(self.tokens) != len(self.titles):
                raise DataError(
                    f"ItemCatalog: {len(self.tokens)} tokens for {len(self.titles)} titles"
                )
            self.id_by_token = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.titles)

    def __repr__(self) -> str:
        return f"ItemCatalog({len(self.titles)} items, {len(self.ids_by_title)} distinct titles)"

    def title(self, i: int) -> str:
        """Title of item id ``i``."""
        return self.titles[i]

    def token(self, i: int) -> str | None:
        """The source-data id of item ``i`` (None when the catalogue has none)."""
        return None if self.tokens is None else self.tokens[i]

    def ids(self, title: str) -> list[int]:
        """All item ids whose title is exactly ``title`` (empty list if none)."""
        return self.ids_by_title.get(title, [])

    @property
    def unique_titles(self) -> list[str]:
        """Distinct titles in first-occurrence order (one trie path per title)."""
        return list(self.ids_by_title)


@dataclass(eq=False)  # identity equality: comparing arrays/lists field-wise is rarely meant
class RecDataset:
    """Train/valid/test samples over one item catalogue.

    ``popularity`` is int64 ``[num_items]``: how often each item is the TARGET of a train sample
    (computed from ``train`` when not given).
    """

    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    items: ItemCatalog
    category: str
    name: str
    popularity: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.popularity is None:
            self.popularity = target_counts(self.train, len(self.items))

    @property
    def num_items(self) -> int:
        """Size of the item catalogue."""
        return len(self.items)

    @property
    def category_word(self) -> str:
        """The word used in prompts for this category (the reference prompt's word)."""
        return category_word(self.category)

    def split(self, name: str) -> list[Sample]:
        """The split called ``name`` (train, valid or test)."""
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}; expected train, valid or test")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (
            f"RecDataset(name={self.name!r}, category={self.category!r}, items={len(self.items)}, "
            f"train={len(self.train)}, valid={len(self.valid)}, test={len(self.test)})"
        )


def target_counts(samples: Sequence[Sample], num_items: int) -> np.ndarray:
    """int64 ``[num_items]``: number of samples whose target is each item."""
    counts = np.zeros(num_items, dtype=np.int64)
    if samples:
        np.add.at(counts, np.fromiter((s.target_id for s in samples), dtype=np.int64), 1)
    return counts


# The reference prompt's category words (other categories: lower-cased, underscores as spaces).
_CATEGORY_WORDS = {
    "cds_and_vinyl": "musics",
    "toys_and_games": "toys and games",
    "video_games": "video games",
    "movies_and_tv": "movies",
    "office_products": "office products",
}

# "CDs_and_Vinyl_5_2015-10-2018-11" -> "CDs_and_Vinyl" (k-core and time window suffix).
_NAME_SUFFIX = re.compile(r"_\d+_\d{4}-\d{1,2}-\d{4}-\d{1,2}$")


def category_from_name(name: str) -> str:
    """Category of a dataset file/dir name: drops the ``_<k>_<start>-<end>`` suffix,
    a trailing ``_<year>`` and the ``.csv``/``.csv.gz``/``.txt`` extension."""
    base = re.sub(r"\.(csv\.gz|csv|txt|gz)$", "", name)
    base = _NAME_SUFFIX.sub("", base)
    base = re.sub(r"_(19|20)\d\d$", "", base)  # e.g. the folder "Video_Games_2015"
    return base


def category_word(category: str) -> str:
    """Prompt word for a category: CDs_and_Vinyl -> "musics", Video_Games -> "video games",
    Movies_and_TV -> "movies", ...; anything else lower-cased with ``_`` -> space.

    Idempotent on its outputs (``category_word("musics") == "musics"``), so callers may pass
    either the category name or the word.
    """
    base = category_from_name(category.strip())
    key = base.lower().replace(" ", "_")
    if key in _CATEGORY_WORDS:
        return _CATEGORY_WORDS[key]
    return base.lower().replace("_", " ")

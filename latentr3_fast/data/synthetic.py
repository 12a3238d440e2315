"""A built-in synthetic catalogue with structure a tiny model can learn in minutes on a CPU.

The embedded default dataset of the CLI. Generative story (all draws from ``random.Random(seed)``):

* Items are books in ``num_genres`` genres. Most belong to a series with numbered volumes
  (``"The Silent Harbor Mystery Vol. 3"``), the rest are standalone; the genre word is in the
  title, so titles are short (3-4 words + volume, ~6-12 BPE tokens as targets).
* Each series/standalone has a popularity weight (log-normal), so there is a popularity signal.
* Each user has 1-2 favourite genres. Their sequence starts with an entry item (volume 1 or a
  standalone) of a favourite genre; then, at every step:
  - if the last item has an unread next volume: read it with probability ``p_next_volume``;
  - else with probability ``p_noise`` an entry item of any genre (by popularity weight);
  - else an entry item of a favourite genre, drawn by popularity weight.
* Samples and the split follow the paper's datasets (App. A: history <= 10, global temporal
  80/10/10 split), with per-user timestamps drawn so that users overlap in time.

So "predict the next volume of the last series, else popular items of the user's genre" is far
better than global popularity (see tests/data/test_data_synthetic.py), and a model must read the
history (copy the series name, increment the volume) to get there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import ConfigError
from .records import ItemCatalog, RecDataset
from .samples import sequences_to_samples, temporal_split

__all__ = ["make_synthetic", "GENRES"]

GENRES = (
    "Mystery",
    "Fantasy",
    "Romance",
    "Horror",
    "Western",
    "Poetry",
    "Travel",
    "Cooking",
    "History",
    "Science",
    "Comedy",
    "Thriller",
)
# Short, common words: a 512-token BPE learns most of them whole, so targets stay short.
_ADJECTIVES = [
    "Silent",
    "Golden",
    "Broken",
    "Hidden",
    "Frozen",
    "Wild",
    "Quiet",
    "Lost",
    "Iron",
    "Bright",
    "Secret",
    "Silver",
    "Dark",
    "Red",
    "Blue",
    "Old",
]
_NOUNS = [
    "Harbor",
    "River",
    "Garden",
    "Empire",
    "Crown",
    "Forest",
    "Road",
    "Tower",
    "Mirror",
    "Island",
    "Storm",
    "Valley",
    "Bridge",
    "Castle",
    "Moon",
    "Star",
]


@dataclass
class _Catalogue:
    """Books in creation order (before the id shuffle): series volumes and standalones."""

    titles: list[str] = field(default_factory=list)
    genre_of: list[int] = field(default_factory=list)
    next_volume: list[int | None] = field(default_factory=list)  # id of the next volume, if any
    entries_by_genre: list[list[int]] = field(default_factory=list)  # volume 1s, standalones
    entry_weight: dict[int, float] = field(default_factory=dict)  # popularity of an entry
    standalone: list[int] = field(default_factory=list)


def _build_catalogue(
    rng: random.Random,
    num_items: int,
    genres: tuple[str, ...],
    p_standalone: float,
    max_volumes: int,
) -> _Catalogue:
    """Series (titles with ``Vol. n``) and standalones until ``num_items`` titles exist."""
    # Per genre, series names (adjective, noun) without repetition; the genre word is part of
    # the title, so a name may recur across genres without duplicating a title.
    names = [(adjective, noun) for adjective in _ADJECTIVES for noun in _NOUNS]
    free = [rng.sample(names, len(names)) for _ in genres]
    catalogue = _Catalogue(entries_by_genre=[[] for _ in genres])
    titles = catalogue.titles
    overflow = 0
    while len(titles) < num_items:
        genre = rng.randrange(len(genres))
        if free[genre]:
            adjective, noun = free[genre].pop()
            base = f"{adjective} {noun} {genres[genre]}"
        else:  # only for catalogues far beyond the default size
            overflow += 1
            adjective, noun = names[overflow % len(names)]
            base = f"{adjective} {noun} {genres[genre]} {overflow}"
        if rng.random() < 0.15:
            base = "The " + base
        num_volumes = 1 if rng.random() < p_standalone else rng.randint(2, max_volumes)
        num_volumes = min(num_volumes, num_items - len(titles))
        weight = rng.lognormvariate(0.0, 1.0)
        first = len(titles)
        for volume in range(num_volumes):
            titles.append(base if num_volumes == 1 else f"{base} Vol. {volume + 1}")
            catalogue.genre_of.append(genre)
            last = volume + 1 == num_volumes
            catalogue.next_volume.append(None if last else first + volume + 1)
        catalogue.entries_by_genre[genre].append(first)
        catalogue.entry_weight[first] = weight
        if num_volumes == 1:
            catalogue.standalone.append(first)
    return catalogue


def _duplicate_titles(rng: random.Random, catalogue: _Catalogue, duplicate_rate: float) -> None:
    """A few standalones take another same-genre standalone's title (real catalogues have
    duplicates: "Greatest Hits" x54 in CDs)."""
    standalone = catalogue.standalone
    num_duplicates = max(2, round(duplicate_rate * len(standalone))) if duplicate_rate > 0 else 0
    for i in rng.sample(standalone, min(num_duplicates, len(standalone) // 2)):
        same = [j for j in standalone if catalogue.genre_of[j] == catalogue.genre_of[i] and j != i]
        if same:
            catalogue.titles[i] = catalogue.titles[rng.choice(same)]


def _user_items(
    rng: random.Random,
    catalogue: _Catalogue,
    favourites: list[int],
    length: int,
    p_next_volume: float,
    p_noise: float,
) -> list[int]:
    """One user's reading order (catalogue indices, no repeats), per the module docstring."""
    all_entries = [e for entries in catalogue.entries_by_genre for e in entries]

    def pick(candidates: list[int], seen: set[int]) -> int | None:
        """An unseen candidate drawn by popularity weight (None when all are seen)."""
        unseen = [c for c in candidates if c not in seen]
        if not unseen:
            return None
        return rng.choices(unseen, weights=[catalogue.entry_weight[c] for c in unseen])[0]

    seen: set[int] = set()
    sequence: list[int] = []
    while len(sequence) < length:
        last = sequence[-1] if sequence else None
        next_volume = catalogue.next_volume[last] if last is not None else None
        item: int | None = None
        if next_volume is not None and next_volume not in seen and rng.random() < p_next_volume:
            item = next_volume
        elif sequence and rng.random() < p_noise:
            item = pick(all_entries, seen)
        if item is None:
            item = pick(catalogue.entries_by_genre[rng.choice(favourites)], seen)
        if item is None:
            item = pick(all_entries, seen)
        if item is None:
            break
        seen.add(item)
        sequence.append(item)
    return sequence


def make_synthetic(
    num_items: int = 400,
    num_users: int = 600,
    seed: int = 0,
    *,
    num_genres: int = 8,
    min_len: int = 4,
    max_len: int = 14,
    p_next_volume: float = 0.75,
    p_noise: float = 0.1,
    p_standalone: float = 0.3,
    max_volumes: int = 6,
    duplicate_rate: float = 0.05,
    category: str = "Books",
) -> RecDataset:
    """A deterministic (per ``seed``) synthetic :class:`RecDataset`.

    Defaults (400 items, 600 users) give about 3.7k train and ~460 valid/test samples, sized
    for a ~5 minute end-to-end CPU run.
    """
    if num_items < 2 or num_users < 1:
        raise ConfigError(f"num_items={num_items}, num_users={num_users}: need >= 2 and >= 1")
    if not 1 <= num_genres <= len(GENRES):
        raise ConfigError(f"num_genres={num_genres}: must be in 1..{len(GENRES)}")
    if not 2 <= min_len <= max_len:
        raise ConfigError(f"min_len={min_len}, max_len={max_len}: need 2 <= min_len <= max_len")
    rng = random.Random(seed)  # one stream, drawn in this order: catalogue, ids, users
    catalogue = _build_catalogue(rng, num_items, GENRES[:num_genres], p_standalone, max_volumes)
    _duplicate_titles(rng, catalogue, duplicate_rate)

    # Ids are a seeded permutation, so that id order says nothing about series order.
    new_id = list(range(len(catalogue.titles)))
    rng.shuffle(new_id)  # new_id[catalogue index] = item id
    titles = [""] * len(catalogue.titles)
    for old, new in enumerate(new_id):
        titles[new] = catalogue.titles[old]

    sequences: dict[str, list[tuple[float, int]]] = {}
    width = len(str(num_users))
    for user in range(num_users):
        favourites = rng.sample(range(num_genres), 1 if rng.random() < 0.5 else min(2, num_genres))
        length = rng.randint(min_len, max_len)
        time = rng.uniform(0.0, 1000.0)
        items = _user_items(rng, catalogue, favourites, length, p_next_volume, p_noise)
        times = []
        for _ in items:
            time += rng.expovariate(1.0 / 20.0)
            times.append(round(time, 3))
        sequences[f"U{user:0{width}d}"] = [(t, new_id[i]) for t, i in zip(times, items)]

    train, valid, test = temporal_split(sequences_to_samples(sequences, titles))
    return RecDataset(
        train=train,
        valid=valid,
        test=test,
        items=ItemCatalog(titles),
        category=category,
        name=f"synthetic_{num_items}x{num_users}_s{seed}",
    )

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
* Samples and the split follow SPEC section 1 (history <= 10, global temporal 80/10/10 split),
  with per-user timestamps drawn so that users overlap in time.

So "predict the next volume of the last series, else popular items of the user's genre" is far
better than global popularity (see tests/data/test_data_synthetic.py), and a model must read the
history (copy the series name, increment the volume) to get there.
"""

from __future__ import annotations

import random

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
    rng = random.Random(seed)
    genres = GENRES[:num_genres]

    # ---- catalogue: series (lists of titles) with a genre and a weight --------------------
    # Per genre, series names (adjective, noun) without repetition; the genre word is part of
    # the title, so a name may recur across genres without duplicating a title.
    names = [(a, n) for a in _ADJECTIVES for n in _NOUNS]
    free = [rng.sample(names, len(names)) for _ in genres]
    titles: list[str] = []
    genre_of: list[int] = []
    next_of: list[int | None] = []  # id of the next volume, if any
    entries_by_genre: list[list[int]] = [[] for _ in genres]
    entry_weight: dict[int, float] = {}
    standalone: list[int] = []
    k = 0
    while len(titles) < num_items:
        g = rng.randrange(num_genres)
        if free[g]:
            adj, noun = free[g].pop()
            base = f"{adj} {noun} {genres[g]}"
        else:  # only for catalogues far beyond the default size
            k += 1
            adj, noun = names[k % len(names)]
            base = f"{adj} {noun} {genres[g]} {k}"
        if rng.random() < 0.15:
            base = "The " + base
        n_vol = 1 if rng.random() < p_standalone else rng.randint(2, max_volumes)
        n_vol = min(n_vol, num_items - len(titles))
        weight = rng.lognormvariate(0.0, 1.0)
        first = len(titles)
        for v in range(n_vol):
            titles.append(base if n_vol == 1 else f"{base} Vol. {v + 1}")
            genre_of.append(g)
            next_of.append(first + v + 1 if v + 1 < n_vol else None)
        entries_by_genre[g].append(first)
        entry_weight[first] = weight
        if n_vol == 1:
            standalone.append(first)
    # A few duplicate titles (real catalogues have them: "Greatest Hits" x54 in CDs).
    n_dup = max(2, round(duplicate_rate * len(standalone))) if duplicate_rate > 0 else 0
    for i in rng.sample(standalone, min(n_dup, len(standalone) // 2)):
        same = [j for j in standalone if genre_of[j] == genre_of[i] and j != i]
        if same:
            titles[i] = titles[rng.choice(same)]

    # Ids are a seeded permutation, so that id order says nothing about series order.
    perm = list(range(len(titles)))
    rng.shuffle(perm)  # perm[old] = new id
    new_titles = [""] * len(titles)
    for old, new in enumerate(perm):
        new_titles[new] = titles[old]

    all_entries = [e for es in entries_by_genre for e in es]

    def pick(cands: list[int], seen: set[int]) -> int | None:
        free = [c for c in cands if c not in seen]
        if not free:
            return None
        return rng.choices(free, weights=[entry_weight[c] for c in free])[0]

    # ---- users ---------------------------------------------------------------------------
    sequences: dict[str, list[tuple[float, int]]] = {}
    width = len(str(num_users))
    for u in range(num_users):
        favs = rng.sample(range(num_genres), 1 if rng.random() < 0.5 else min(2, num_genres))
        length = rng.randint(min_len, max_len)
        t = rng.uniform(0.0, 1000.0)
        seen: set[int] = set()
        seq: list[int] = []
        while len(seq) < length:
            last = seq[-1] if seq else None
            nxt = next_of[last] if last is not None else None
            item: int | None = None
            if nxt is not None and nxt not in seen and rng.random() < p_next_volume:
                item = nxt
            elif seq and rng.random() < p_noise:
                item = pick(all_entries, seen)
            if item is None:
                item = pick(entries_by_genre[rng.choice(favs)], seen)
            if item is None:
                item = pick(all_entries, seen)
            if item is None:
                break
            seen.add(item)
            seq.append(item)
        times = []
        for _ in seq:
            t += rng.expovariate(1.0 / 20.0)
            times.append(round(t, 3))
        sequences[f"U{u:0{width}d}"] = [(tm, perm[i]) for tm, i in zip(times, seq)]

    timed = sequences_to_samples(sequences, new_titles)
    train, valid, test = temporal_split(timed)
    return RecDataset(
        train=train,
        valid=valid,
        test=test,
        items=ItemCatalog(new_titles),
        category=category,
        name=f"synthetic_{num_items}x{num_users}_s{seed}",
    )

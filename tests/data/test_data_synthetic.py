"""The built-in synthetic catalogue: deterministic, well-formed, and learnable far beyond
popularity (a hand-written next-volume rule beats the popularity ranking on test)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from latentr3_fast.data import make_synthetic
from latentr3_fast.data.synthetic import GENRES

VOL = re.compile(r"^(.*) Vol\. (\d+)$")


@pytest.fixture(scope="module")
def ds():
    return make_synthetic()


def test_deterministic_per_seed():
    a, b, c = make_synthetic(seed=5), make_synthetic(seed=5), make_synthetic(seed=6)
    assert a.items.titles == b.items.titles
    assert a.train == b.train and a.valid == b.valid and a.test == b.test
    assert a.items.titles != c.items.titles or a.train != c.train


def test_default_sizes_and_split(ds):
    assert len(ds.items) == 400
    assert 3000 <= len(ds.train) <= 6000
    assert 200 <= len(ds.valid) <= 800 and 200 <= len(ds.test) <= 800
    n = len(ds.train) + len(ds.valid) + len(ds.test)
    assert len(ds.train) == int(0.8 * n) and len(ds.valid) == int(0.9 * n) - int(0.8 * n)
    assert ds.popularity.dtype == np.int64 and ds.popularity.shape == (400,)
    assert int(ds.popularity.sum()) == len(ds.train)
    assert ds.popularity.tolist() == [
        sum(s.target_id == i for s in ds.train) for i in range(len(ds.items))
    ]


def test_samples_well_formed(ds):
    titles = ds.items.titles
    for s in ds.train + ds.valid + ds.test:
        assert 1 <= len(s.history_ids) <= 10
        assert s.history_titles == tuple(titles[i] for i in s.history_ids)
        assert s.target_title == titles[s.target_id]
        assert s.target_id not in s.history_ids  # users never re-read a book
    # Titles: genre word present, 2-5 words before the volume, few duplicates.
    for t in titles:
        base = VOL.sub(r"\1", t)
        assert 2 <= len(base.split()) <= 5
        assert any(g in base.split() for g in GENRES)
    dup = sum(len(v) - 1 for v in ds.items.ids_by_title.values())
    assert 1 <= dup <= 0.03 * len(titles)


def test_consecutive_samples_of_a_user_chain(ds):
    """Within a user, each later sample's history ends with the earlier target (same sequence)."""
    by_user: dict[str, list] = {}
    for s in ds.train + ds.valid + ds.test:
        by_user.setdefault(s.user_id, []).append(s)
    for rows in by_user.values():
        rows.sort(key=lambda s: len(s.history_ids))  # history grows until it is capped
        for prev, nxt in zip(rows, rows[1:]):
            if len(nxt.history_ids) <= 10 and len(prev.history_ids) < 10:
                assert nxt.history_ids == prev.history_ids + (prev.target_id,)


def hr_at_10(ds, ranker):
    return float(np.mean([s.target_title in ranker(s)[:10] for s in ds.test]))


def genre(title: str) -> str:
    return next(g for g in GENRES if g in VOL.sub(r"\1", title).split())


@pytest.mark.parametrize("seed", [0, 1])
def test_next_volume_rule_beats_popularity(seed):
    ds = make_synthetic(seed=seed)
    titles = ds.items.titles
    order = [int(i) for i in np.argsort(-ds.popularity, kind="stable")]
    top10 = [titles[i] for i in order[:10]]

    by_genre: dict[str, list[str]] = {}
    for i in order:
        by_genre.setdefault(genre(titles[i]), []).append(titles[i])

    def rule(s):
        out = []
        m = VOL.match(s.history_titles[-1])
        if m:
            out.append(f"{m.group(1)} Vol. {int(m.group(2)) + 1}")
        g = Counter(genre(t) for t in s.history_titles).most_common(1)[0][0]
        out += [t for t in by_genre[g] if t not in s.history_titles and t not in out]
        return out

    pop, oracle = hr_at_10(ds, lambda s: top10), hr_at_10(ds, rule)
    assert pop < 0.2
    assert oracle > 0.6 and oracle > 3 * pop

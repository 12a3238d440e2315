"""RecBole atomic files -> RecDataset (samples as in paper App. A), against hand-derived samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentr3_fast.data import Sample, load_dataset, load_recbole
from latentr3_fast.errors import DataError

ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
    "10\tAlpha One\t1990\n"
    "20\tBeta\t1991\n"
    "30\tGamma  Ray\t1992\n"
    "40\t\t1993\n"
    "50\tUnused\t1994\n"
)
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u2\t20\t5\t100\n"
    "u1\t10\t4\t50\n"
    "u1\t30\t3\t40\n"
    "u1\t20\t2\t60\n"
    "u2\t10\t1\t100\n"
    "u2\t40\t1\t90\n"
    "u3\t30\t1\t10\n"
    "u3\t10\t1\t20\n"
    "u3\t20\t1\t200\n"
)


def write(tmp_path: Path, item: str = ITEM, inter: str = INTER) -> Path:
    (tmp_path / "ml.item").write_text(item, encoding="utf-8")
    (tmp_path / "ml.inter").write_text(inter, encoding="utf-8")
    return tmp_path


def test_conversion_matches_hand_derivation(tmp_path):
    write(tmp_path)
    with pytest.warns(UserWarning) as rec:
        ds = load_recbole(tmp_path, "ml")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "1 item(s) with an empty title" in msgs
    assert "dropped 1 interaction(s)" in msgs
    # ids in .item order among used items: 10 -> 0, 20 -> 1, 30 -> 2 ("Unused" never occurs)
    assert ds.items.titles == ["Alpha One", "Beta", "Gamma Ray"]
    A, B, G = (0, "Alpha One"), (1, "Beta"), (2, "Gamma Ray")

    def s(hist, tgt, user):
        return Sample(tuple(h[0] for h in hist), tuple(h[1] for h in hist), tgt[0], tgt[1], user)

    # Per user by time: u1 G@40 A@50 B@60; u2 B@100 A@100 (tie: file order); u3 G@10 A@20 B@200.
    # Samples by target time: u3@20, u1@50, u1@60, u2@100, u3@200; n = 5 -> 4 / 0 / 1.
    assert ds.train == [s([G], A, "u3"), s([G], A, "u1"), s([G, A], B, "u1"), s([B], A, "u2")]
    assert ds.valid == []
    assert ds.test == [s([G, A], B, "u3")]
    assert ds.popularity.tolist() == [3, 1, 0]
    assert ds.name == "ml" and ds.category == "ml"
    # RecBole's own item ids are kept, so predictions can be mapped back to them
    assert ds.items.tokens == ["10", "20", "30"]
    assert ds.items.id_by_token == {"10": 0, "20": 1, "30": 2} and ds.items.token(2) == "30"
    # --category replaces the file name in the prompt
    with pytest.warns(UserWarning):
        assert load_recbole(tmp_path, "ml", category="movies").category == "movies"


def test_history_capped_at_ten_and_split(tmp_path):
    items = "item_id:token\ttitle:token_seq\n" + "".join(f"i{k}\tItem {k}\n" for k in range(13))
    inter = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
        f"u\ti{k}\t{1000 - k}\n"
        for k in range(13)  # written newest first
    )
    write(tmp_path, items, inter)
    ds = load_dataset(f"recbole:{tmp_path}/ml", category="Books")
    rows = ds.train + ds.valid + ds.test
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (int(0.8 * 12), 1, 12 - 10)
    seq = list(range(12, -1, -1))  # item ids in time order: i12 (t=988) ... i0 (t=1000)
    for pos, r in enumerate(rows, 1):
        assert r.target_id == seq[pos]
        assert r.history_ids == tuple(seq[max(0, pos - 10) : pos])
    assert len(rows[-1].history_ids) == 10 and ds.category_word == "books"


@pytest.mark.parametrize(
    "item,inter,match",
    [
        (ITEM, INTER.replace("timestamp:float", "time:float"), "missing column timestamp"),
        (ITEM.replace("movie_title", "name"), INTER, "missing column title"),
        (ITEM, INTER.replace("\t60\n", "\tsoon\n"), r"line 5, column timestamp: 'soon'"),
        (ITEM.replace("20\tBeta", "10\tBeta"), INTER, "line 3, column item_id: duplicate"),
        (ITEM, "", "empty file"),
    ],
    ids=["no-timestamp", "no-title", "bad-timestamp", "duplicate-item", "empty-inter"],
)
@pytest.mark.filterwarnings("ignore:.*empty title")
def test_bad_recbole_input(tmp_path, item, inter, match):
    write(tmp_path, item, inter)
    with pytest.raises(DataError, match=match):
        load_recbole(tmp_path, "ml")


def test_missing_recbole_file(tmp_path):
    (tmp_path / "ml.inter").write_text(INTER, encoding="utf-8")
    with pytest.raises(DataError, match=r"ml\.item: file not found"):
        load_recbole(tmp_path, "ml")

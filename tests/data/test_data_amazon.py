"""Raw Amazon-2018 preprocessing on small generated dumps (gzip and plain), including the
3-month back-off, title cleaning and the iterated 5-core, checked against a hand derivation."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from latentr3_fast.data import load_dataset
from latentr3_fast.data.amazon import clean_title, main, preprocess_amazon
from latentr3_fast.errors import DataError


def ts(y, m, d, h=0):
    return int(datetime(y, m, d, h, tzinfo=timezone.utc).timestamp())


TITLES = {
    "A0": " &quot;Hello&quot; &amp; World ",  # -> 'Hello" & World'
    "A1": " ".join(f"w{k}" for k in range(20)),  # exactly 20 words: kept
    "A2": "ab",  # length 2: kept
    "A3": "Delta",
    "A4": "Echo",
    "A5": "Foxtrot",
    **{f"B{k}": f"Bravo {k}" for k in range(5)},
    "N1": "Noise",
    "T1": "x",  # length 1: dropped
    "T2": '<span id="t">Foo</span>',  # dropped
    "T3": " ".join(["w"] * 21),  # 21 words: dropped
}
CLEAN = {**TITLES, "A0": 'Hello" & World', "A2": "ab"}


def raw_reviews() -> list[dict]:
    r = []
    # Group A: 6 users x 6 items in Aug 2018 (inside the first window [2018-07, 2018-11)).
    for u in range(6):
        for i in range(6):
            r.append((f"a{u}", f"A{i}", ts(2018, 8, 1) + (u * 6 + i) * 3600))
    # Cascade: X has 5 reviews, one on N1 which has only 4 reviewers -> N1 goes, then X goes.
    for i in range(4):
        r.append(("X", f"A{i}", ts(2018, 9, 1, i)))
    r.append(("X", "N1", ts(2018, 9, 2)))
    for u in range(3):
        r.append((f"a{u}", "N1", ts(2018, 9, 3, u)))
    # Group B: 6 users x 5 items in May 2018 (needs the back-off to 2018-04); all reviews of a
    # user share one timestamp, written B4..B0: the stable sort keeps that order.
    for u in range(6):
        for i in reversed(range(5)):
            r.append((f"b{u}", f"B{i}", ts(2018, 5, 10 + u)))
    # Group C: items whose titles are dropped (T4 has no meta title at all).
    for u in range(6):
        for t in ("T1", "T2", "T3", "T4"):
            r.append((f"c{u}", t, ts(2018, 8, 20, u)))
    random.Random(0).shuffle(r)  # file order must not matter except for ties
    # Restore B's within-user tie order (file order) after the shuffle.
    b = sorted((x for x in r if x[0].startswith("b")), key=lambda x: (x[0], -int(x[1][1])))
    r = [x for x in r if not x[0].startswith("b")] + b
    return [
        {"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 4.0, "reviewText": "ok"}
        for u, a, t in r
    ]


def raw_meta() -> list[dict]:
    out = [{"asin": a, "title": t, "brand": "z"} for a, t in TITLES.items()]
    out.append({"asin": "T4", "brand": "no title"})
    return out


def write_jsonl(path: Path, rows: list[dict], gz: bool) -> Path:
    data = "".join(json.dumps(x) + "\n" for x in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(params=["reviews-gz", "meta-gz"])
def raw(tmp_path, request):
    gz_reviews = request.param == "reviews-gz"
    rv = write_jsonl(
        tmp_path / ("Tst_5.json.gz" if gz_reviews else "Tst_5.json"), raw_reviews(), gz_reviews
    )
    mt = write_jsonl(tmp_path / "meta_Tst.json.gz", raw_meta(), not gz_reviews)
    return rv, mt


def test_clean_title_rules():
    assert clean_title(" &quot;Hi&quot; ") == "Hi"
    assert clean_title('"Tom &amp; Jerry"') == "Tom & Jerry"
    assert clean_title("a") is None and clean_title("") is None and clean_title(None) is None
    assert clean_title('"a"') is None  # length 1 after stripping
    assert clean_title("<span id='x'>") is None
    assert clean_title(" ".join("w" * 21)) is None and clean_title(" ".join("w" * 20)) is not None


def test_backoff_kcore_samples_split(raw, tmp_path):
    rv, mt = raw
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="24 review"):  # 4 untitled items x 6 reviews
        rep = preprocess_amazon(rv, mt, out, start="2018-07", end="2018-11", min_items=10)
    assert rep.attempts == [("2018-07", 6), ("2018-04", 11)]
    assert rep.start == "2018-04" and rep.name == "Tst_5_2018-04-2018-11"
    assert rep.num_items == 11 and rep.num_users == 12  # a0-a5, b0-b5 (X removed by round 2)
    # samples: A 6 users x 5 + B 6 users x 4 = 54 -> int(43.2) = 43, int(48.6) = 48
    assert rep.rows == {"train": 43, "valid": 5, "test": 6}

    ds = load_dataset(out)
    assert ds.name == rep.name and ds.category == "Tst"
    asins = sorted([f"A{i}" for i in range(6)] + [f"B{i}" for i in range(5)])
    random.Random(42).shuffle(asins)  # step 7: ids from a seeded shuffle
    assert ds.items.titles == [CLEAN[a] for a in asins]
    idx = {a: k for k, a in enumerate(asins)}
    rows = ds.train + ds.valid + ds.test
    assert all(s.user_id != "X" for s in rows)
    # Global temporal order: every B sample (May) precedes every A sample (Aug).
    kinds = ["B" if asins[s.target_id][0] == "B" else "A" for s in rows]
    assert kinds == ["B"] * 24 + ["A"] * 30
    # B users: equal timestamps, file order B4..B0; users in sorted order.
    b_rows = rows[:24]
    assert [s.user_id for s in b_rows] == [f"b{u}" for u in range(6) for _ in range(4)]
    seq = [idx[f"B{i}"] for i in (4, 3, 2, 1, 0)]
    for k, s in enumerate(b_rows[:4], 1):
        assert s.history_ids == tuple(seq[:k]) and s.target_id == seq[k]
    # A users: review times are u*6+i hours after Aug 1 -> user order a0..a5, items A0..A5.
    a_seq = [idx[f"A{i}"] for i in range(6)]
    for k, s in enumerate(rows[24:29], 1):
        assert s.user_id == "a0" and s.history_ids == tuple(a_seq[:k])
        assert s.history_titles == tuple(CLEAN[f"A{i}"] for i in range(k))
    assert ds.test[-1].user_id == "a5" and ds.test[-1].target_title == "Foxtrot"


@pytest.mark.filterwarnings("ignore:.*review.s. of items without")
def test_backoff_stops_at_earliest_review(raw, tmp_path):
    rv, mt = raw
    with pytest.warns(UserWarning, match=r"only 11 items \(< min_items=100\)"):
        rep = preprocess_amazon(rv, mt, tmp_path / "o", start="2018-07", min_items=100)
    assert [a[0] for a in rep.attempts] == ["2018-07", "2018-04"]


def test_no_backoff_when_enough(raw, tmp_path):
    rv, mt = raw
    with pytest.warns(UserWarning):
        rep = preprocess_amazon(rv, mt, tmp_path / "o", start="2018-07", min_items=6)
    assert rep.attempts == [("2018-07", 6)] and rep.rows["train"] == int(0.8 * 30)


@pytest.mark.filterwarnings("ignore:.*review")
def test_cli_in_process(raw, tmp_path, capsys):
    rv, mt = raw
    out = tmp_path / "cli"
    argv = ["--reviews", str(rv), "--meta", str(mt), "--out", str(out)]
    assert main(argv + ["--start", "2018-07", "--min-items", "10", "--end", "2018-11"]) == 0
    assert "11 items" in capsys.readouterr().out
    assert (out / "info" / "Tst_5_2018-04-2018-11.txt").is_file()
    assert main(argv + ["--start", "2018-13"]) == 2


def test_cli_module_entry_point(tmp_path):
    rv = write_jsonl(tmp_path / "Tst_5.json", raw_reviews(), gz=False)
    mt = write_jsonl(tmp_path / "meta_Tst.json", raw_meta(), gz=False)
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "latentr3_fast.data.amazon", "--reviews", str(rv), "--meta"]
    cmd += [str(mt), "--out", str(out), "--start", "2018-07", "--min-items", "10"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(load_dataset(out).items) == 11


@pytest.mark.parametrize(
    "reviews_text,match",
    [
        ('{"reviewerID": "u", "asin": "A0"}\n', r"line 1, column unixReviewTime: missing"),
        ('{"reviewerID": "u", "asin": "A0", "unixReviewTime": 1}\n{oops\n', "line 2: not a JSON"),
        ("", "empty file"),
        ('{"reviewerID": "u", "asin": "A0", "unixReviewTime": "soon"}\n', "unixReviewTime"),
    ],
)
def test_bad_raw_input(tmp_path, reviews_text, match):
    rv = tmp_path / "R_5.json"
    rv.write_text(reviews_text, encoding="utf-8")
    mt = write_jsonl(tmp_path / "meta.json", raw_meta(), gz=False)
    with pytest.raises(DataError, match=match):
        preprocess_amazon(rv, mt, tmp_path / "o")


def test_non_utf8_raw(tmp_path):
    rv = tmp_path / "R_5.json"
    rv.write_bytes(b'{"reviewerID": "u", "asin": "A0", "unixReviewTime": 1}\n{"x": "\xff"}\n')
    mt = write_jsonl(tmp_path / "meta.json", raw_meta(), gz=False)
    with pytest.raises(DataError, match=r"R_5\.json: line 2, byte column \d+: invalid UTF-8"):
        preprocess_amazon(rv, mt, tmp_path / "o")

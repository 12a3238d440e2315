"""Standard-layout loading: the shared real datasets (exact counts, load time), a written
round trip, and every bad-input case (errors name file, row and column)."""

from __future__ import annotations

import ast
import gzip
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentr3_fast.data import load_dataset, read_info
from latentr3_fast.data.layout import parse_int_list, parse_str_list
from latentr3_fast.data.records import category_from_name, category_word
from latentr3_fast.errors import DataError

NAME = "Toys_and_Games_5_2016-10-2018-11"  # the name tests/data/conftest.py writes


# ---- real data -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "folder,name,counts,items,category",
    [
        (
            "CDs_and_Vinyl",
            "CDs_and_Vinyl_5_2015-10-2018-11",
            (49251, 6156, 6157),
            5841,
            "CDs_and_Vinyl",
        ),
        (
            "Video_Games_2015",
            "Video_Games_5_2015-10-2018-11",
            (49133, 6142, 6142),
            3858,
            "Video_Games",
        ),
        (
            "Movies_and_TV_2017",
            "Movies_and_TV_5_2017-10-2018-11",
            (21937, 2742, 2743),
            2653,
            "Movies_and_TV",
        ),
    ],
)
def test_shared_datasets(shared_data, folder, name, counts, items, category):
    t0, c0 = time.perf_counter(), time.process_time()
    ds = load_dataset(shared_data / folder)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (len(ds.train), len(ds.valid), len(ds.test)) == counts
    assert len(ds.items) == items and ds.name == name and ds.category == category
    assert int(ds.popularity.sum()) == counts[0]
    if folder == "CDs_and_Vinyl":
        print(f"\nCDs train+valid+test load: {seconds:.2f} s wall, {cpu:.2f} s CPU")
        # CPU time: wall time on the shared 2-core machine depends on the other jobs' load.
        assert cpu < 10.0
        assert ds.category_word == "musics"
        assert len(ds.items.ids_by_title) == 5377  # the reference data's 5377 distinct titles
        assert len(ds.items.ids("Greatest Hits")) == 54
        s = ds.train[1]  # second data row of the rebuilt train file, checked by eye
        assert s.history_ids == (2956,) and s.history_titles == ("Doris Day's Greatest Hits",)
        assert s.target_id == 5031 and s.target_title == "Doris Day - 100 Hits Legends"
    for s in ds.train[:200] + ds.test[:200]:
        assert 1 <= len(s.history_ids) <= 10 and len(s.history_titles) == len(s.history_ids)


# ---- round trip ----------------------------------------------------------------------------
def test_round_trip(layout_dir, small_ds):
    ds = load_dataset(layout_dir)
    assert ds.name == NAME and ds.category == "Toys_and_Games"
    assert ds.category_word == "toys and games"
    assert ds.items.titles == small_ds.items.titles
    assert ds.train == small_ds.train and ds.valid == small_ds.valid and ds.test == small_ds.test
    np.testing.assert_array_equal(ds.popularity, small_ds.popularity)
    assert load_dataset(layout_dir, category="Office_Products").category_word == "office products"


def test_gzip_split_and_none_columns(layout_dir, small_ds):
    p = layout_dir / "train" / f"{NAME}.csv"
    text = p.read_text(encoding="utf-8")
    p.unlink()
    gz = p.with_suffix(".csv.gz")
    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    assert load_dataset(layout_dir).train == small_ds.train


def test_several_info_files_need_name(layout_dir, small_ds):
    shutil.copy(layout_dir / "info" / f"{NAME}.txt", layout_dir / "info" / "Other.txt")
    with pytest.raises(DataError, match="several info files"):
        load_dataset(layout_dir)
    assert load_dataset(layout_dir, name=NAME).test == small_ds.test


def test_category_words():
    assert category_from_name("CDs_and_Vinyl_5_2015-10-2018-11") == "CDs_and_Vinyl"
    assert category_from_name("Video_Games_2015") == "Video_Games"
    assert category_from_name("Movies_and_TV_5_2017-10-2018-11.csv.gz") == "Movies_and_TV"
    expected = {
        "CDs_and_Vinyl": "musics",
        "Toys_and_Games": "toys and games",
        "Video_Games": "video games",
        "Movies_and_TV": "movies",
        "Office_Products": "office products",
        "Musical_Instruments": "musical instruments",
        "Books": "books",
        "musics": "musics",
        "video games": "video games",
    }
    for cat, word in expected.items():
        assert category_word(cat) == word


@pytest.mark.parametrize(
    "s", ["[1, 2, 3]", "[]", "[ 1]", "[1,2]", "[-3, 4]", "[1, 2,]", "[True]", "(1, 2)", "[1.5]"]
)
def test_int_list_fast_path_matches_literal_eval(s):
    assert parse_int_list(s) == ast.literal_eval(s)
    assert type(parse_int_list(s)) is type(ast.literal_eval(s))


@given(st.lists(st.text(max_size=12), max_size=6))
@settings(max_examples=300, deadline=None)
def test_str_list_fast_path_matches_literal_eval(titles):
    s = repr(titles)
    assert parse_str_list(s) == ast.literal_eval(s) == titles


@given(st.lists(st.integers(-(10**12), 10**12), max_size=12))
@settings(max_examples=200, deadline=None)
def test_int_list_fast_path_property(ids):
    assert parse_int_list(repr(ids)) == ids
    assert parse_int_list(str(tuple(ids))) == ast.literal_eval(str(tuple(ids)))


@pytest.mark.parametrize("s", ["['a','b']", "['it\\'s']", '["it\'s"]', "['a', \"b'c\"]", "['é']"])
def test_str_list_edge_cases(s):
    assert parse_str_list(s) == ast.literal_eval(s)


# ---- bad input -----------------------------------------------------------------------------
def _csv(layout_dir: Path, split: str = "valid") -> Path:
    return layout_dir / split / f"{NAME}.csv"


def _edit_row(path: Path, row: int, old: str, new: str) -> None:
    """Replace the first ``old`` in physical line ``row`` (= data row; header is line 0)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    assert old in lines[row], (old, lines[row])
    lines[row] = lines[row].replace(old, new, 1)
    path.write_text("\n".join(lines), encoding="utf-8")


def _set_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set one CSV cell (data row ``row``, 1-based) through the csv module."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    rows[row][rows[0].index(column)] = value
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _load_error(layout_dir: Path) -> str:
    """The message of the DataError that loading ``layout_dir`` raises."""
    with pytest.raises(DataError) as e:
        load_dataset(layout_dir)
    return str(e.value)


def test_missing_split_file(layout_dir):
    _csv(layout_dir, "test").unlink()
    with pytest.raises(DataError, match=r"test.*missing test split file"):
        load_dataset(layout_dir)


def test_missing_info(layout_dir):
    (layout_dir / "info" / f"{NAME}.txt").unlink()
    with pytest.raises(DataError, match="no NAME.txt info file"):
        load_dataset(layout_dir)


def test_missing_column(layout_dir):
    p = _csv(layout_dir)
    _edit_row(p, 0, ",history_item_title,", ",history_titles,")
    msg = _load_error(layout_dir)
    assert str(p) in msg and "row 0" in msg and "history_item_title" in msg


def test_malformed_list_literal(layout_dir):
    p = _csv(layout_dir)
    _set_cell(p, 3, "history_item_title", "['Unclosed Title', 'x'")
    msg = _load_error(layout_dir)
    assert str(p) in msg and "row 3 (line 4)" in msg and "column history_item_title" in msg
    assert "malformed list literal" in msg


def test_item_id_not_in_info(layout_dir):
    p = _csv(layout_dir, "train")
    _set_cell(p, 5, "history_item_id", "[40]")  # 40 items: ids 0..39
    _set_cell(p, 5, "history_item_title", "['T']")
    msg = _load_error(layout_dir)
    assert str(p) in msg and "row 5" in msg and "column history_item_id" in msg
    assert "item id 40 not in the info file" in msg


@pytest.mark.parametrize(
    "split, row, column, value, message",
    [
        ("valid", 2, "history_rating", "[5.0)", r"row 2 .*column history_rating: malformed"),
        (
            "test",
            1,
            "item_id",
            "999",
            r"row 1 \(line 2\), column item_id: item id 999 not in",
        ),
        (
            "valid",
            1,
            "history_item_id",
            "[]",
            r"row 1 \(line 2\), column history_item_id: empty history",
        ),
    ],
    ids=["malformed_unused_list_column", "target_id_not_in_info", "empty_history"],
)
def test_bad_cell(layout_dir, split, row, column, value, message):
    _set_cell(_csv(layout_dir, split), row, column, value)
    with pytest.raises(DataError, match=message):
        load_dataset(layout_dir)


def test_non_utf8_bytes(layout_dir):
    p = _csv(layout_dir)
    raw = p.read_bytes().split(b"\n")
    raw[4] = raw[4].replace(b"Vol", b"V\xffl", 1) if b"Vol" in raw[4] else raw[4] + b"\xff"
    p.write_bytes(b"\n".join(raw))
    msg = _load_error(layout_dir)
    assert str(p) in msg and "line 5" in msg and "invalid UTF-8" in msg


@pytest.mark.parametrize("which", ["csv", "info"])
def test_empty_file(layout_dir, which):
    p = _csv(layout_dir, "train") if which == "csv" else layout_dir / "info" / f"{NAME}.txt"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{p.name}: empty file"):
        load_dataset(layout_dir)


def test_header_only_warns(layout_dir):
    p = _csv(layout_dir)
    p.write_text(p.read_text(encoding="utf-8").split("\n")[0] + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="no data rows"):
        ds = load_dataset(layout_dir)
    assert ds.valid == []


def test_blank_lines_are_counted(layout_dir, small_ds):
    p = _csv(layout_dir)
    p.write_text(p.read_text(encoding="utf-8").replace("\n", "\n\n", 2), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 2 blank line"):
        ds = load_dataset(layout_dir)
    assert ds.valid == small_ds.valid


def test_wrong_field_count(layout_dir):
    p = _csv(layout_dir)
    lines = p.read_text(encoding="utf-8").split("\n")
    lines[2] += ",extra"
    p.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column -: 12 fields, header has 11"):
        load_dataset(layout_dir)


@pytest.mark.parametrize(
    "content,match",
    [
        ("A\t0\nB\t2\n", r"line 2, column item_id: id 2 outside 0..1"),
        ("A\t0\nB\t0\n", r"line 2, column item_id: duplicate id 0"),
        ("A\t0\nB\n", r"line 2, column item_id: expected 'title<TAB>item_id'"),
        ("A\tx\n", r"line 1, column item_id: 'x' is not an integer"),
    ],
)
def test_bad_info_file(tmp_path, content, match):
    p = tmp_path / "x.txt"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_info(p)


def test_info_title_with_tab_keeps_last_field_as_id(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("a\tb\t0\nc\t1\n", encoding="utf-8")
    assert read_info(p) == ["a\tb", "c"]


def test_no_silent_title_mismatch(layout_dir):
    info = layout_dir / "info" / f"{NAME}.txt"
    lines = info.read_text(encoding="utf-8").split("\n")
    lines = [(f"Renamed\t{ln.rsplit(chr(9), 1)[1]}" if ln else ln) for ln in lines]
    info.write_text("\n".join(lines), encoding="utf-8")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_dataset(layout_dir)
    assert any("target titles differ" in str(x.message) for x in w)


def test_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "nope")


def test_title_count_mismatch(layout_dir):
    p = _csv(layout_dir)
    _set_cell(p, 2, "history_item_title", "[]")
    with pytest.raises(DataError, match=r"row 2 .*column history_item_title: 0 titles for"):
        load_dataset(layout_dir)


def test_optional_columns_may_be_absent(layout_dir, small_ds):
    """Only the four Sample columns are required; user ids become None without user_id."""
    import csv
    import io

    for split in ("train", "valid", "test"):
        p = _csv(layout_dir, split)
        rows = list(csv.reader(io.StringIO(p.read_text(encoding="utf-8"), newline="")))
        keep = [
            rows[0].index(c)
            for c in ("history_item_id", "item_id", "history_item_title", "item_title")
        ]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([[r[k] for k in keep] for r in rows])
        p.write_text(buf.getvalue(), encoding="utf-8")
    ds = load_dataset(layout_dir)
    assert [s.history_ids for s in ds.test] == [s.history_ids for s in small_ds.test]
    assert all(s.user_id is None for s in ds.train)

"""Fuzzed bad input for the dataset loaders (standard CSV layout and RecBole atomic files).

Property: ``load_dataset`` either returns a dataset equal to what was written, or raises a
``DataError`` whose message names the offending file (and the row/line for row-level faults).
Any other exception type is a bug. The verdict for a corrupted cell is computed independently
(``ast.literal_eval`` / ``int`` / the format rules), so a loader that silently accepts garbage
fails too.
"""

from __future__ import annotations

import ast
import csv
import math
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from reliability_helpers import count, fuzz

from latentr3_fast.data import load_dataset, load_recbole
from latentr3_fast.errors import DataError, LatentR3Error

NAME = "CDs_and_Vinyl_5_2015-10-2018-11"
COLUMNS = (
    "user_id",
    "item_asins",
    "item_asin",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
)
SPLITS = ("train", "valid", "test")

# Titles: quotes, tabs, newlines, CR, backslashes, commas, emoji, NUL, digits of other scripts.
NASTY = "\"'\t\n\r\\,[]() \x00😀🎵é٣１"
title_text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(NASTY), max_size=25),
    st.just(""),
    st.integers(1000, 5000).map(lambda n: "x" * n),  # very long titles
)
# Titles the info file can hold ("title<TAB>id" lines): no tab, newline or trailing CR.
info_title = title_text.filter(lambda t: "\t" not in t and "\n" not in t and "\r" not in t)


def _write_info(root: Path, lines: list[str]) -> Path:
    (root / "info").mkdir(parents=True, exist_ok=True)
    p = root / "info" / f"{NAME}.txt"
    p.write_bytes("".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass"))
    return p


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


@st.composite
def datasets(draw):
    """A valid standard-layout dataset: titles and three splits of samples."""
    n = draw(st.integers(1, 6))
    titles = draw(st.lists(info_title, min_size=n, max_size=n))
    sample = st.tuples(
        st.lists(st.integers(0, n - 1), min_size=1, max_size=4), st.integers(0, n - 1)
    )
    splits = {sp: draw(st.lists(sample, min_size=1, max_size=4)) for sp in SPLITS}
    return titles, splits


def _rows(titles: list[str], samples) -> list[list[str]]:
    rows = []
    for k, (hist, tgt) in enumerate(samples):
        rec = {
            "user_id": f"U{k}",
            "item_asins": repr([f"A{i}" for i in hist]),
            "item_asin": f"A{tgt}",
            "history_item_id": repr(list(hist)),
            "item_id": str(tgt),
            "history_item_title": repr([titles[i] for i in hist]),
            "item_title": titles[tgt],
            "history_rating": repr([5.0] * len(hist)),
            "rating": "5.0",
            "history_timestamp": repr([None] * len(hist)),
            "timestamp": "None",
        }
        rows.append([rec[c] for c in COLUMNS])
    return rows


def _write_dataset(root: Path, titles, splits) -> dict[str, Path]:
    paths = {"info": _write_info(root, [f"{t}\t{i}" for i, t in enumerate(titles)])}
    for sp in SPLITS:
        paths[sp] = _write_csv(root / sp / f"{NAME}.csv", list(COLUMNS), _rows(titles, splits[sp]))
    return paths


def _load(root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(root)


@given(datasets())
@fuzz(60)
def test_valid_layout_round_trips(ds):
    """Whatever the titles (quotes, emoji, NUL, 5000 chars), a well-formed dir loads exactly."""
    count("csv:valid-layout")
    titles, splits = ds
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _write_dataset(root, titles, splits)
        got = _load(root)
    assert got.items.titles == titles
    assert got.category == "CDs_and_Vinyl"
    for sp in SPLITS:
        rows = got.split(sp)
        assert [(list(s.history_ids), s.target_id) for s in rows] == [
            (list(h), t) for h, t in splits[sp]
        ]
        for s, (h, t) in zip(rows, splits[sp]):
            assert s.history_titles == tuple(titles[i] for i in h)
            assert s.target_title == titles[t]


def _expect_int_list(cell: str, n_items: int, n_titles: int) -> bool:
    """Independent verdict for a history_item_id cell."""
    try:
        v = ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return (
        isinstance(v, list | tuple)
        and len(v) == n_titles
        and len(v) > 0
        and all(type(x) is int and 0 <= x < n_items for x in v)
    )


def _expect_str_list(cell: str, n_hist: int) -> bool:
    try:
        v = ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return isinstance(v, list | tuple) and len(v) == n_hist and all(type(x) is str for x in v)


def _expect_item_id(cell: str, n_items: int) -> bool:
    try:
        return 0 <= int(cell) < n_items
    except ValueError:
        return False


cell_text = st.one_of(
    st.text(alphabet=st.sampled_from("[]0123456789,- '\"\\xNoneTrue.٣１e+"), max_size=20),
    st.text(max_size=15),
    st.sampled_from(
        [
            "[]",
            "[1, 2",
            "[[1]]",
            "[True]",
            "[1.0]",
            "[-1]",
            "[10**9]",
            "[" * 300 + "]" * 300,
            "['\\ud800']",
            "['a'",
            "('a',)",
            "['a', 'b']",
            "[0]",
            "0",
            "[٣]",
            "[0_0]",
            "None",
            "1e3",
            "-0",
            " 0",
            "0x1",
            "９",
        ]
    ),
)


@given(
    datasets(),
    st.sampled_from(SPLITS),
    st.sampled_from(["history_item_id", "item_id", "history_item_title"]),
    cell_text,
    st.data(),
)
@fuzz(100)
def test_corrupted_cell(ds, split, column, cell, data):
    """One cell replaced by arbitrary text: exact load when the text is valid for the column,
    else DataError naming the file, the data row and the column."""
    count("csv:corrupted-cell")
    titles, splits = ds
    samples = splits[split]
    k = data.draw(st.integers(0, len(samples) - 1), label="row")
    hist, _ = samples[k]
    if column == "history_item_id":
        ok = _expect_int_list(cell, len(titles), len(hist))
    elif column == "item_id":
        ok = _expect_item_id(cell, len(titles))
    else:
        ok = _expect_str_list(cell, len(hist))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = _write_dataset(root, titles, splits)
        rows = _rows(titles, samples)
        rows[k][COLUMNS.index(column)] = cell
        _write_csv(paths[split], list(COLUMNS), rows)
        try:
            got = _load(root)
        except DataError as e:
            msg = str(e)
            assert not ok, f"valid cell {cell!r} in {column} rejected: {msg}"
            assert str(paths[split]) in msg, msg
            assert f"row {k + 1} " in msg, msg
            # a well-formed id list of the wrong length is reported on the titles column
            assert column in msg or "titles for" in msg, msg
            return
    assert ok, f"invalid cell {cell!r} in column {column} was accepted"
    count("csv:corrupted-cell-accepted")
    s = got.split(split)[k]
    if column == "history_item_id":
        assert list(s.history_ids) == list(ast.literal_eval(cell))
    elif column == "item_id":
        assert s.target_id == int(cell)
    else:
        assert list(s.history_titles) == list(ast.literal_eval(cell))


@given(datasets(), st.sampled_from(SPLITS), st.data())
@fuzz(60)
def test_structural_faults(ds, split, data):
    """Missing/empty/truncated/non-UTF-8 files, wrong field counts, missing columns, bad info
    lines: DataError naming the file; never another exception."""
    count("csv:structural")
    titles, splits = ds
    fault = data.draw(
        st.sampled_from(
            [
                "missing_file",
                "empty_file",
                "truncate",
                "bad_utf8",
                "extra_field",
                "missing_field",
                "drop_column",
                "info_no_tab",
                "info_bad_id",
                "info_dup_id",
                "info_out_of_range",
            ]
        ),
        label="fault",
    )
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = _write_dataset(root, titles, splits)
        target = paths["info"] if fault.startswith("info_") else paths[split]
        raw = target.read_bytes()
        lines = raw.decode("utf-8").split("\n")
        must_fail = True
        if fault == "missing_file":
            target.unlink()
        elif fault == "empty_file":
            target.write_bytes(b"")
        elif fault == "truncate":
            cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
            target.write_bytes(raw[:cut])
            must_fail = False  # a cut at a row boundary is a valid (shorter) file
        elif fault == "bad_utf8":
            at = data.draw(st.integers(0, len(raw)), label="at")
            target.write_bytes(raw[:at] + b"\xff" + raw[at:])
        elif fault in ("extra_field", "missing_field"):
            rows = _rows(titles, splits[split])
            k = data.draw(st.integers(0, len(rows) - 1), label="row")
            rows[k] = rows[k] + ["x"] if fault == "extra_field" else rows[k][:-1]
            _write_csv(target, list(COLUMNS), rows)
        elif fault == "drop_column":
            c = data.draw(st.sampled_from(["history_item_id", "item_id", "history_item_title"]))
            j = COLUMNS.index(c)
            rows = [r[:j] + r[j + 1 :] for r in _rows(titles, splits[split])]
            _write_csv(target, [x for x in COLUMNS if x != c], rows)
        else:
            k = data.draw(st.integers(0, len(titles) - 1), label="line")
            if fault == "info_no_tab":
                lines[k] = lines[k].replace("\t", " ")
            elif fault == "info_bad_id":
                lines[k] = lines[k].rpartition("\t")[0] + "\tseven"
            elif fault == "info_dup_id":
                assume(len(titles) > 1)
                lines[k] = lines[k].rpartition("\t")[0] + f"\t{(k + 1) % len(titles)}"
            else:
                lines[k] = lines[k].rpartition("\t")[0] + f"\t{len(titles) + 3}"
            target.write_bytes("\n".join(lines).encode("utf-8"))
        try:
            _load(root)
        except DataError as e:
            assert str(target) in str(e) or str(target.parent) in str(e), str(e)
            return
    assert not must_fail, f"fault {fault} in {target.name} was not detected"


def test_unencodable_title_is_rejected_by_the_loader(tmp_path, tiny_tokenizer):
    """A lone surrogate written as an escape (``['\\ud800']``) is a valid literal but not text:
    the loader must refuse it (DataError naming row and column), not hand it to the tokenizer."""
    count("csv:surrogate")
    from latentr3_fast.data import PromptBuilder

    paths = _write_dataset(tmp_path, ["a", "b"], {sp: [([0], 1)] for sp in SPLITS})
    rows = _rows(["a", "b"], [([0], 1)])
    rows[0][COLUMNS.index("history_item_title")] = "['\\ud800']"
    _write_csv(paths["train"], list(COLUMNS), rows)
    try:
        ds = _load(tmp_path)
    except DataError as e:
        assert "history_item_title" in str(e)
        return
    pb = PromptBuilder(tiny_tokenizer, ds.category, num_latent=1, max_length=128)
    try:
        pb.encode_many(ds.train)
    except LatentR3Error:
        return  # acceptable: refused with the package's error
    # reached only if neither refused it (then the model would train on a broken title)
    raise AssertionError("lone-surrogate title neither rejected by the loader nor the prompt")


# --------------------------------------------------------------------------------- RecBole
rb_token = st.text(alphabet=st.sampled_from("abcXYZ019 _-😀\"'"), min_size=0, max_size=6)
_rb_text = st.text(st.characters(codec="utf-8", exclude_characters="\t\n"), min_size=1, max_size=20)
rb_title = st.one_of(_rb_text, _rb_text, _rb_text, st.just("  "), st.just("x" * 3000))
rb_ts = st.one_of(
    st.integers(0, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32).map(repr),
)
rb_bad_ts = st.sampled_from(["", "x", "--1", "1,5", "０x"])


@st.composite
def recbole_files(draw):
    n_items = draw(st.integers(1, 6))
    ids = draw(st.lists(rb_token, min_size=n_items, max_size=n_items))
    titles = draw(st.lists(rb_title, min_size=n_items, max_size=n_items))
    item_header = draw(
        st.sampled_from(
            [
                "item_id:token\ttitle:token_seq",
                "item_id:token\tmovie_title:token_seq",
                "title:token_seq\titem_id:token",
                "item_id:token\tname:token_seq",
            ]
        )
    )
    users = draw(st.lists(rb_token, min_size=1, max_size=4))
    inter = draw(
        st.lists(
            st.tuples(
                st.sampled_from(users),
                st.sampled_from(ids) | st.sampled_from(ids) | st.just("ghost"),
                rb_ts,
            ),
            min_size=1,
            max_size=20,
        )
    )
    if inter and draw(st.integers(0, 3)) == 0:  # one bad timestamp in a quarter of the files
        k = draw(st.integers(0, len(inter) - 1))
        inter[k] = (inter[k][0], inter[k][1], draw(rb_bad_ts))
    inter_header = draw(
        st.sampled_from(
            [
                "user_id:token\titem_id:token\ttimestamp:float",
                "item_id:token\tuser_id:token\trating:float\ttimestamp:float",
                "user_id:token\titem_id:token",
            ]
        )
    )
    return ids, titles, item_header, inter, inter_header


def _rb_line(header: str, values: dict[str, str]) -> str:
    return "\t".join(values.get(f.split(":")[0], "1") for f in header.split("\t"))


@given(recbole_files())
@fuzz(80)
def test_recbole_fuzz(files):
    """RecBole atomic files with random ids, titles, timestamps and headers: a dataset whose
    samples are consistent with the files, or DataError naming .item or .inter."""
    count("recbole")
    ids, titles, item_header, inter, inter_header = files
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        item_lines = [item_header]
        for iid, t in zip(ids, titles):
            title_key = "movie_title" if "movie_title" in item_header else "title"
            item_lines.append(_rb_line(item_header, {"item_id": iid, title_key: t}))
        (root / "x.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
        inter_lines = [inter_header] + [
            _rb_line(inter_header, {"user_id": u, "item_id": i, "timestamp": ts})
            for u, i, ts in inter
        ]
        (root / "x.inter").write_text("\n".join(inter_lines) + "\n", encoding="utf-8")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = load_recbole(root, "x")
        except DataError as e:
            assert str(root / "x.item") in str(e) or str(root / "x.inter") in str(e), str(e)
            return
    # Independent expectations from the files.
    count("recbole:loaded")
    assert "name:" not in item_header and "timestamp" in inter_header
    # a line of empty fields ("\t\t") is a blank line to the loader: skipped with a warning
    line = {"user_id": 0, "item_id": 1, "timestamp": 2}
    fields = [f.split(":")[0] for f in inter_header.split("\t")]
    inter = [
        x for x in inter if "\t".join(x[line[f]] if f in line else "1" for f in fields).strip()
    ]
    for _, _, ts in inter:
        float(ts)  # every kept timestamp parsed (else DataError was due)
    assert all(t and t == " ".join(t.split()) for t in ds.items.titles)
    titled = {}
    for iid, t in zip(ids, titles):
        if " ".join(t.split()):
            titled.setdefault(iid, " ".join(t.split()))
    per_user: dict[str, int] = {}
    for u, i, _ in inter:
        if i in titled:
            per_user[u] = per_user.get(u, 0) + 1
    expected = sum(c - 1 for c in per_user.values())
    rows = ds.train + ds.valid + ds.test
    assert len(rows) == expected
    for s in rows:
        assert 1 <= len(s.history_ids) <= 10
        assert s.target_title == ds.items.titles[s.target_id]
        assert s.history_titles == tuple(ds.items.titles[i] for i in s.history_ids)


@pytest.mark.parametrize("ts", ["nan", "inf", "-Infinity", "NaN"])
def test_recbole_nan_timestamp_is_rejected(tmp_path, ts):
    """Non-finite timestamps would make the temporal sort / split order arbitrary."""
    count("recbole:nan-timestamp")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\na\tA\nb\tB\n")
    rows = ["user_id:token\titem_id:token\ttimestamp:float", "u\ta\t1", f"u\tb\t{ts}", "u\ta\t3"]
    (tmp_path / "x.inter").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"x\.inter: line 3, column timestamp: '{ts}'"):
        load_recbole(tmp_path, "x")
    rows[2] = "u\tb\t2.5e9"  # finite floats stay accepted
    (tmp_path / "x.inter").write_text("\n".join(rows) + "\n")
    assert len(load_recbole(tmp_path, "x").items) == 2


def test_int_fast_path_agrees_with_literal_eval():
    from latentr3_fast.data.layout import parse_int_list

    count("csv:fast-path")
    with pytest.raises(SyntaxError):
        ast.literal_eval("[٣]")
    with pytest.raises((ValueError, SyntaxError)):
        parse_int_list("[٣]")


def test_math_sanity_of_expectations():
    """The independent verdicts themselves (so the fuzz oracles cannot be vacuous)."""
    assert _expect_int_list("[0, 1]", 2, 2) and not _expect_int_list("[True]", 2, 1)
    assert not _expect_int_list("[]", 2, 0) and not _expect_int_list("[2]", 2, 1)
    assert _expect_str_list("['a', \"b'\"]", 2) and not _expect_str_list("['a']", 2)
    assert _expect_item_id(" 1", 2) and not _expect_item_id("1.0", 2) and math.isfinite(1.0)

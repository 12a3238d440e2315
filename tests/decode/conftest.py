"""Shared tiny model + catalogue for the decoding tests (built once per session)."""

from __future__ import annotations

import pytest
import torch


def _load_bench_decode():
    """bench/bench_decode.py (bench/ is not a package): its DictTrie is the reference trie."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "bench_decode"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


DictTrie = _load_bench_decode().DictTrie  # plain nested-dict trie: what the authors' code does


@pytest.fixture(scope="session")
def tiny_setup():
    from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer
    from latentr3_fast.decode import ItemTrie
    from latentr3_fast.model import tiny_qwen2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the autouse one below
    try:
        ds = make_synthetic(num_items=30, num_users=40, seed=0, max_len=8)
        tok = train_tokenizer(dataset_corpus(ds), vocab_size=300)
        model = tiny_qwen2(tok, hidden_size=32, seed=0).eval()
        pb = PromptBuilder(tok, ds.category, max_length=100)  # short prompts: fast tests
        trie = ItemTrie.from_catalog(ds.items, pb)
        dict_trie = DictTrie(pb.target_ids(t) for t in ds.items.titles)
    finally:
        torch.set_num_threads(threads)  # never leak the setting into other test dirs
    return {"ds": ds, "tok": tok, "model": model, "pb": pb, "trie": trie, "dict": dict_trie}


def make_batch(setup, rows):
    from latentr3_fast.data import collate

    enc = setup["pb"].encode_many([setup["ds"].test[i] for i in rows])
    return collate(enc, setup["tok"].pad_token_id)


@pytest.fixture
def batch_of(tiny_setup):
    return lambda rows: make_batch(tiny_setup, rows)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # tiny models: intra-op threads only add overhead, and on a loaded 2-core machine
    # oversubscription made these tests ~50x slower (measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)

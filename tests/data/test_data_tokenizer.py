"""The tiny byte-level BPE tokenizer."""

from __future__ import annotations

import time

import pytest

from latentr3_fast.data import EOS_TOKEN, dataset_corpus, make_synthetic, train_tokenizer
from latentr3_fast.errors import ConfigError


@pytest.fixture(scope="module")
def ds():
    return make_synthetic()


def test_trains_fast_with_eos_pad_and_no_bos(ds):
    texts = dataset_corpus(ds)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size=512)
    assert time.perf_counter() - t0 < 1.0
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.pad_token_id == tok.eos_token_id
    ids = tok.encode("Silent Harbor", add_special_tokens=False)
    assert tok.encode("Silent Harbor") == ids  # no BOS/EOS added by default
    assert tok("Silent Harbor")["input_ids"] == ids
    assert tok.eos_token_id not in ids


def test_byte_level_roundtrip_of_unseen_text(ds):
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=300)
    for s in ['"Café Ñandú — 東京"\n', "  two  spaces\t", "<|endoftext|> inside"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    # The special token in text is one token (EOS), not its characters.
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [tok.eos_token_id]


def test_synthetic_targets_are_short(ds):
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=512)
    lens = [len(tok.encode(f'"{t}"\n', add_special_tokens=False)) + 1 for t in ds.items.titles]
    assert 6 <= sum(lens) / len(lens) <= 12  # EOS included
    assert max(lens) <= 20


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_saved_model_dir_loads_with_autotokenizer_to_the_same_ids(ds, tmp_path):
    """The saved model directory is Hugging Face compatible: ``AutoTokenizer`` (which for a
    qwen2 backbone always rebuilds a Qwen2Tokenizer from vocab + merges) gives exactly the ids
    the model was trained with, on prompts, targets, digits, non-ASCII text and specials."""
    import torch
    from transformers import AutoTokenizer

    from latentr3_fast.data import PromptBuilder
    from latentr3_fast.model import tiny_qwen2

    torch.manual_seed(0)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=600)
    model = tiny_qwen2(
        tok, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate=64, seed=0
    )
    model.save_pretrained(tmp_path / "model")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    pb = PromptBuilder(model.tokenizer, ds.category, num_latent=1)
    texts = [model.tokenizer.decode(pb.encode(s).prompt_ids) for s in ds.test[:5]]
    texts += [PromptBuilder.target_text(t) for t in ds.items.titles[:50]]
    texts += [
        "Vol. 12 of 2024: 3.14159, 1,000,000 copies",
        '"Café Ñandú — 東京"\r\n\n  two  spaces\t<|Thought|><|endoftext|> tail',
        "I'LL DON'T it's you've",
    ]
    for text in texts:
        want = model.tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == want, text
        assert loaded.decode(want) == text
    assert loaded.eos_token_id == model.tokenizer.eos_token_id
    assert loaded.pad_token_id == model.tokenizer.pad_token_id
    assert loaded.convert_tokens_to_ids("<|Thought|>") == model.thought_token_id
    assert len(loaded) == len(model.tokenizer)

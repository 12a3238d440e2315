"""Prompt/target construction: byte-exact reference (BIGRec/D³) strings, separate segment
encoding, truncation, label masking; plus tokenization fidelity with the real Qwen tokenizer."""

from __future__ import annotations

import pytest

from latentr3_fast.data import (
    THOUGHT_TOKEN,
    PromptBuilder,
    Sample,
    make_synthetic,
    train_tokenizer,
)
from latentr3_fast.data.tokenizer import dataset_corpus
from latentr3_fast.errors import ConfigError

# Literal reference prompt strings with C = "musics" (CDs_and_Vinyl), written out by hand.
SEG_A_MUSICS = (
    "Below is an instruction that describes a task, paired with an input that provides further"
    " context. Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n"
    "Given a list of musics the user recetenly enjoy, please write a new musics that the user"
    " may bought\n"
)
SEG_B_TWO = (
    "### User Input: \n"
    'The user has palyed the following musicss before: "Hot Rocks", "Greatest Hits"\n\n'
    "### Response: \n"
)

SAMPLE = Sample((3, 7), ("Hot Rocks", "Greatest Hits"), 11, "Abbey Road", "u1")


@pytest.fixture(scope="module")
def tok():
    ds = make_synthetic(num_items=60, num_users=20, seed=1)
    texts = dataset_corpus(ds) + [SEG_A_MUSICS, SEG_B_TWO, '"Abbey Road"\n']
    return train_tokenizer(texts, vocab_size=400)


def test_reference_segments_byte_exact(tok):
    pb = PromptBuilder(tok, "CDs_and_Vinyl")
    assert pb.segment_a() == SEG_A_MUSICS
    assert pb.segment_b(["Hot Rocks", "Greatest Hits"]) == SEG_B_TWO
    assert pb.prompt_text(["Hot Rocks", "Greatest Hits"]) == SEG_A_MUSICS + SEG_B_TWO
    assert pb.target_text("Abbey Road") == '"Abbey Road"\n'
    # The word may also be passed directly, and other categories follow the reference's table.
    assert PromptBuilder(tok, "musics").segment_a() == SEG_A_MUSICS
    vg = PromptBuilder(tok, "Video_Games").segment_b(["A"])
    expected = (
        "### User Input: \n"
        'The user has palyed the following video gamess before: "A"\n\n'
        "### Response: \n"
    )
    assert vg == expected


def test_segments_encoded_separately(tok):
    pb = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=0, max_length=10_000)
    a = tok.encode(SEG_A_MUSICS, add_special_tokens=False)
    b = tok.encode(SEG_B_TWO, add_special_tokens=False)
    assert pb.prompt_ids(SAMPLE.history_titles) == a + b
    t = tok.encode('"Abbey Road"\n', add_special_tokens=False)
    assert pb.target_ids("Abbey Road") == t + [tok.eos_token_id]
    enc = pb.encode(SAMPLE)
    assert enc.prompt_ids == a + b and enc.target_ids == t + [tok.eos_token_id]
    assert tok.decode(enc.prompt_ids) == SEG_A_MUSICS + SEG_B_TWO


def test_clean_template_differs_and_has_no_typos(tok):
    pb = PromptBuilder(tok, "CDs_and_Vinyl", template="clean")
    text = pb.prompt_text(["X"])
    for typo in ("recetenly", "palyed", "may bought", "musicss", ": \n"):
        assert typo not in text
    assert '"X"' in text and text.endswith("### Response:\n")
    with pytest.raises(ConfigError, match="template"):
        PromptBuilder(tok, "CDs_and_Vinyl", template="fancy")


@pytest.mark.parametrize("num_latent", [0, 1, 3])
def test_full_ids_layout_and_labels(tok, num_latent):
    pb = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=num_latent, max_length=10_000)
    ids, labels = pb.full_ids(SAMPLE)
    p, t = pb.prompt_ids(SAMPLE.history_titles), pb.target_ids("Abbey Road")
    th = tok.convert_tokens_to_ids(THOUGHT_TOKEN)
    assert ids == p + [th] * num_latent + t
    assert labels == [-100] * (len(p) + num_latent) + t
    assert labels[-1] == tok.eos_token_id


def test_full_ids_adds_thought_token_once(tok):
    t2 = train_tokenizer(["abc def"], vocab_size=300)
    n0 = len(t2)
    pb = PromptBuilder(t2, "Books", num_latent=2)
    ids, _ = pb.full_ids(SAMPLE)
    assert len(t2) == n0 + 1
    th = t2.convert_tokens_to_ids(THOUGHT_TOKEN)
    assert th == n0 and ids.count(th) == 2
    # "<|Thought|>" in text stays one token (it is a special token now).
    assert t2.encode("x" + THOUGHT_TOKEN, add_special_tokens=False)[-1] == th
    pb.full_ids(SAMPLE)
    assert len(t2) == n0 + 1


@pytest.mark.parametrize("max_length", [20, 37, 64])
@pytest.mark.parametrize("num_latent", [0, 2])
def test_left_truncation(tok, max_length, num_latent):
    long = Sample(tuple(range(10)), tuple(f"Title number {i}" for i in range(10)), 1, "Abbey Road")
    pb = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=num_latent, max_length=max_length)
    full = pb.prompt_ids(long.history_titles)
    enc = pb.encode(long)
    budget = max_length - num_latent - len(enc.target_ids)
    assert len(full) > budget  # the case under test: truncation happens
    assert len(enc.prompt_ids) == budget
    assert enc.prompt_ids == full[-budget:]  # the most recent end is kept
    assert len(enc.prompt_ids) + num_latent + len(enc.target_ids) == max_length
    ids, labels = pb.full_ids(long)
    assert len(ids) == max_length == len(labels)
    # No truncation when it fits.
    pb2 = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=num_latent, max_length=len(full) + 100)
    assert pb2.encode(long).prompt_ids == full


def test_target_longer_than_max_length_is_an_error(tok):
    pb = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=1, max_length=4)
    with pytest.raises(ConfigError, match="max_length=4"):
        pb.encode(SAMPLE)


def test_encode_many_equals_encode(tok):
    ds = make_synthetic(num_items=60, num_users=20, seed=1)
    pb = PromptBuilder(tok, ds.category, num_latent=1, max_length=90)
    rows = ds.train[:50]
    assert pb.encode_many(rows) == [pb.encode(s) for s in rows]
    assert pb.encode_many([]) == []
    titles = ["Abbey Road", "Hot Rocks", "Abbey Road"]
    fresh = PromptBuilder(tok, ds.category)
    assert fresh.target_ids_many(titles) == [pb.target_ids(t) for t in titles]


def test_bad_arguments(tok):
    with pytest.raises(ConfigError, match="num_latent"):
        PromptBuilder(tok, "Books", num_latent=-1)
    with pytest.raises(ConfigError, match="max_length"):
        PromptBuilder(tok, "Books", max_length=1)


# ---- real Qwen tokenizer -------------------------------------------------------------------
def test_qwen_response_header_is_four_tokens(qwen_tokenizer):
    ids = qwen_tokenizer.encode("### Response: \n", add_special_tokens=False)
    assert len(ids) == 4


def test_qwen_target_tokens(qwen_tokenizer):
    pb = PromptBuilder(qwen_tokenizer, "CDs_and_Vinyl")
    ids = pb.target_ids("Greatest Hits")
    pieces = [qwen_tokenizer.decode([i]) for i in ids[:-1]]
    assert pieces == ['"G', "reatest", " Hits", '"\n']
    assert ids[-1] == qwen_tokenizer.eos_token_id


def test_qwen_prompt_roundtrip_and_no_bos(qwen_tokenizer):
    pb = PromptBuilder(qwen_tokenizer, "CDs_and_Vinyl", num_latent=1)
    p = pb.prompt_ids(SAMPLE.history_titles)
    assert qwen_tokenizer.decode(p) == SEG_A_MUSICS + SEG_B_TWO
    a = qwen_tokenizer.encode(SEG_A_MUSICS, add_special_tokens=False)
    assert p[: len(a)] == a
    # Segment A ends with "bought\n" and B starts a new segment: the boundary is kept.
    assert qwen_tokenizer.decode(p[len(a) :]) == SEG_B_TWO


def test_qwen_encode_many_equals_encode(qwen_tokenizer):
    ds = make_synthetic(num_items=60, num_users=20, seed=1)
    rows = ds.test[:20] + [SAMPLE]
    pb = PromptBuilder(qwen_tokenizer, "CDs_and_Vinyl", num_latent=2, max_length=120)
    slow = [pb.encode(s) for s in rows]
    fresh = PromptBuilder(qwen_tokenizer, "CDs_and_Vinyl", num_latent=2, max_length=120)
    assert fresh.encode_many(rows) == slow

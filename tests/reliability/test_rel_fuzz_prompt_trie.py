"""Fuzzed input for PromptBuilder (random titles/histories, tiny BPE) and the C++ item trie.

The trie fuzz runs IN the pytest process on purpose: a segfault or abort in ``latentr3_fast._C``
kills the run, which is the failure this test exists to catch. Every query answer is compared
with a pure-Python dict trie.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reliability_helpers import PYTHON, child_env, count, fuzz

from latentr3_fast.data import IGNORE_INDEX, PromptBuilder, Sample
from latentr3_fast.decode import ItemTrie
from latentr3_fast.errors import ConfigError, LatentR3Error, TrieError

# Valid text only (no lone surrogates: the loader fuzz covers where those come from).
TITLE = st.one_of(
    st.text(st.characters(codec="utf-8") | st.sampled_from("\"'\t\n\r\\😀🎵\x00"), max_size=30),
    st.just(""),
    st.integers(300, 2000).map(lambda n: "ab " * n),
)


@given(
    history=st.lists(TITLE, min_size=0, max_size=12),
    target=TITLE,
    num_latent=st.integers(0, 3),
    max_length=st.integers(2, 400),
    template=st.sampled_from(["reference", "clean"]),
    category=st.sampled_from(["CDs_and_Vinyl", "Video_Games_2015", "weird cat 😀", ""]),
)
@fuzz(100)
def test_prompt_builder_fuzz(
    tiny_tokenizer, history, target, num_latent, max_length, template, category
):
    """Ids decode back to the exact text; truncation keeps the newest tokens and the budget;
    a budget too small for the target is a ConfigError naming max_length."""
    count("prompt")
    tok = tiny_tokenizer
    pb = PromptBuilder(
        tok, category, template=template, num_latent=num_latent, max_length=max_length
    )
    full = pb.prompt_ids(history)
    assert tok.decode(full) == pb.prompt_text(history)
    tgt = pb.target_ids(target)
    assert tgt[-1] == tok.eos_token_id
    assert tok.decode(tgt[:-1]) == f'"{target}"\n'
    sample = Sample(tuple(range(len(history))), tuple(history), 0, target)
    try:
        enc = pb.encode(sample)
    except ConfigError as e:
        assert "max_length" in str(e)
        assert len(tgt) + num_latent >= max_length  # no room for even one prompt token
        with pytest.raises(ConfigError):
            pb.encode_many([sample])
        return
    assert len(tgt) + num_latent < max_length
    assert enc.target_ids == tgt
    assert len(enc.prompt_ids) + num_latent + len(enc.target_ids) <= max_length
    assert enc.prompt_ids == full[len(full) - len(enc.prompt_ids) :]  # left cut: newest kept
    assert len(enc.prompt_ids) == min(len(full), max_length - num_latent - len(tgt))
    (batched,) = pb.encode_many([sample])
    assert batched == enc
    ids, labels = pb.full_ids(sample)
    n_ctx = len(enc.prompt_ids) + num_latent
    assert ids[n_ctx:] == enc.target_ids and labels[n_ctx:] == enc.target_ids
    assert labels[:n_ctx] == [IGNORE_INDEX] * n_ctx


@given(
    max_length=st.integers(-5, 1),
    num_latent=st.integers(-3, -1) | st.integers(0, 2),
    template=st.sampled_from(["reference", "nope", ""]),
)
@fuzz(30)
def test_prompt_builder_bad_args(tiny_tokenizer, max_length, num_latent, template):
    count("prompt:bad-args")
    with pytest.raises(ConfigError) as ei:
        PromptBuilder(
            tiny_tokenizer, "CDs", template=template, num_latent=num_latent, max_length=max_length
        )
    assert any(a in str(ei.value) for a in ("max_length", "num_latent", "template"))


# ------------------------------------------------------------------------------------ trie
class RefTrie:
    """Dict-of-dicts reference trie."""

    def __init__(self, seqs: list[list[int]], ids: list[int]) -> None:
        self.nodes: list[dict[int, int]] = [{}]
        self.items: list[list[int]] = [[]]
        self.depth = [0]
        self.path: list[tuple[int, ...]] = [()]
        for s, i in zip(seqs, ids):
            n = 0
            for t in s:
                if t not in self.nodes[n]:
                    self.nodes.append({})
                    self.items.append([])
                    self.depth.append(self.depth[n] + 1)
                    self.path.append(self.path[n] + (t,))
                    self.nodes[n][t] = len(self.nodes) - 1
                n = self.nodes[n][t]
            self.items[n].append(i)


I64 = st.integers(-(2**63), 2**63 - 1)
TOKEN = st.one_of(st.integers(0, 40), st.integers(-3, 2**40), I64)
# Half well-formed (small alphabet: shared prefixes, duplicates, prefixes of each other),
# half arbitrary (empty sequences, negative and huge ids).
SEQS = st.lists(
    st.lists(st.integers(0, 6), min_size=1, max_size=6), min_size=1, max_size=12
) | st.lists(st.lists(TOKEN, min_size=0, max_size=6), min_size=0, max_size=12)


def _valid(seqs, ids, vocab):
    if not seqs or any(len(s) == 0 for s in seqs):
        return False
    if any(t < 0 or (vocab is not None and t >= vocab) for s in seqs for t in s):
        return False
    return len(ids) == len(seqs) and len(set(ids)) == len(ids) and all(i >= 0 for i in ids)


def _path_map(trie: ItemTrie, ref: RefTrie) -> dict[int, int]:
    """ref node -> trie state, by walking every ref path through the C++ trie."""
    out = {0: 0}
    for n in range(1, len(ref.nodes)):
        out[n] = trie.walk(list(ref.path[n]))
    return out


@given(
    seqs=SEQS,
    ids=st.none() | st.none() | st.lists(st.integers(-2, 30), min_size=0, max_size=12),
    vocab=st.none() | st.none() | st.integers(-1, 50),
    queries=st.lists(st.tuples(I64 | st.integers(-2, 60), TOKEN), min_size=0, max_size=20),
)
@fuzz(100)
def test_trie_fuzz_in_process(seqs, ids, vocab, queries):
    """Random sequences / ids / vocab bounds / states / tokens: correct answers or TrieError."""
    count("trie:build")
    ids_list = list(range(len(seqs))) if ids is None else ids
    try:
        trie = ItemTrie(seqs, ids, vocab_size=vocab)
    except TrieError as e:
        assert not _valid(seqs, ids_list, vocab if vocab and vocab > 0 else None) or (
            vocab is not None and vocab <= 0
        ), str(e)
        return
    assert _valid(seqs, ids_list, vocab if vocab else None)
    count("trie:built")
    ref = RefTrie(seqs, ids_list)
    assert trie.num_nodes == len(ref.nodes) and trie.num_items == len(seqs)
    m = _path_map(trie, ref)
    states = np.array([m[n] for n in range(len(ref.nodes))], dtype=np.int64)
    assert sorted(states.tolist()) == list(range(len(ref.nodes)))  # a bijection
    off, toks, kids = trie.allowed(states, return_children=True)
    for k, n in enumerate(range(len(ref.nodes))):
        got = toks[off[k] : off[k + 1]].tolist()
        assert got == sorted(ref.nodes[n])
        assert kids[off[k] : off[k + 1]].tolist() == [m[ref.nodes[n][t]] for t in got]
    assert trie.is_terminal(states).tolist() == [bool(ref.items[n]) for n in range(len(states))]
    assert trie.depth(states).tolist() == ref.depth
    for n in range(len(ref.nodes)):
        assert sorted(trie.items(int(m[n])).tolist()) == sorted(ref.items[n])
    inv = {v: k for k, v in m.items()}
    for state, token in queries:
        count("trie:query")
        ok_state = 0 <= state < trie.num_nodes
        try:
            got = trie.advance([state], [token], strict=False)[0]
        except TrieError as e:
            assert not ok_state and str(state) in str(e)
        else:
            assert ok_state
            want = ref.nodes[inv[state]].get(token)
            assert got == (-1 if want is None else m[want])
            if want is None:
                with pytest.raises(TrieError, match=str(token)):
                    trie.advance([state], [token], strict=True)
        for fn in (trie.allowed, trie.is_terminal, trie.depth, trie.allowed_padded):
            try:
                fn([state])
            except TrieError as e:
                assert not ok_state and "state" in str(e)
            else:
                assert ok_state
        try:
            trie.items(state)
        except TrieError:
            assert not ok_state
        if ok_state:
            width = len(ref.nodes[inv[state]])
            if width > 0:
                with pytest.raises(TrieError, match="width"):
                    trie.allowed_padded([state], width - 1)


@given(data=st.data())
@fuzz(50)
def test_trie_bad_argument_types(data):
    """Floats, bools, nested lists, strings, 2-D arrays, tensors: TrieError naming the argument."""
    count("trie:types")
    trie = ItemTrie([[1, 2], [1, 3], [4]])
    bad = data.draw(
        st.sampled_from(
            [
                [0.5],
                np.zeros((2, 2), dtype=np.int64),
                torch.tensor([0.0]),
                torch.tensor([True]),
                np.array(["a"]),
                [[0]],
                [2**64],
                np.array([2**63], dtype=np.uint64),
            ]
        )
    )
    method = data.draw(st.sampled_from(["allowed", "is_terminal", "depth", "advance"]))
    with pytest.raises(LatentR3Error, match="states|tokens"):
        if method == "advance":
            trie.advance(bad, bad)
        else:
            getattr(trie, method)(bad)
    if isinstance(bad, list) and (isinstance(bad[0], list | bool) or bad[0] == 2**64):
        return  # construction with these: test_trie_flatten_rejects_non_int_tokens
    with pytest.raises(LatentR3Error, match="sequences|item_ids|token"):
        ItemTrie([[1, 2], bad] if not isinstance(bad, np.ndarray) or bad.ndim == 1 else [bad])


@pytest.mark.parametrize("bad", [[[0]], [2**64], [True]], ids=["nested", "2**64", "bool"])
def test_trie_flatten_rejects_non_int_tokens(bad):
    """Nested lists, ints beyond int64 and bools are not token ids (first version: numpy
    ValueError, StopIteration, and True accepted as 1)."""
    count("trie:types")
    with pytest.raises(TrieError, match=r"sequences\[1\]"):
        ItemTrie([[1, 2], bad])


def test_trie_rejects_bad_offsets_before_reading_tokens():
    """from_flat with decreasing offsets: must say so, not read past the token array.

    In a subprocess: the first version read tokens[b:e] of each sequence before checking the
    next offset, out of bounds (garbage 'token id' errors, possibly a segfault)."""
    count("faults:trie-oob-offsets")
    code = (
        "import numpy as np\n"
        "from latentr3_fast.decode import ItemTrie\n"
        "from latentr3_fast.errors import TrieError\n"
        "try:\n"
        "    ItemTrie.from_flat(np.array([1, 2, 3]), np.array([0, 1 << 40, 3]))\n"
        "except TrieError as e:\n"
        "    print('MSG', e)\n"
    )
    r = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]  # -11 would be the segfault
    msg = r.stdout
    _check_offsets_message(msg)


def _check_offsets_message(msg: str) -> None:
    assert msg.startswith("MSG"), msg
    assert "offset" in msg, f"error does not name the offsets: {msg}"


def test_device_trie_checks_states():
    """Out-of-range states on the device twin: TrieError (first version: -1 silently answered
    for the last node, num_nodes raised a bare IndexError)."""
    count("trie:device-states")
    dt = ItemTrie([[1, 2], [1, 3]]).to_device("cpu")
    for bad in (-1, dt.num_nodes):
        with pytest.raises(TrieError, match="state"):
            dt.is_terminal(torch.tensor([bad]))
        with pytest.raises(TrieError, match="state"):
            dt.depth(torch.tensor([bad]))


@given(
    tokens=st.lists(st.integers(0, 12), max_size=12)
    | st.lists(st.integers(-2, 12) | I64, max_size=12),
    data=st.data(),
    vocab=st.none() | st.integers(1, 13),
)
@fuzz(100)
def test_trie_from_flat_fuzz_in_process(tokens, data, vocab):
    """Arbitrary (tokens, offsets) straight into the C++ constructor, in this process:
    a trie equal to the reference, or TrieError; never a crash or an out-of-bounds read."""
    count("trie:from_flat")
    cuts = st.sets(st.integers(1, max(1, len(tokens) - 1)), max_size=4).map(
        lambda c: [0, *sorted(x for x in c if x < len(tokens)), len(tokens)]
    )
    offsets = data.draw(
        st.lists(st.integers(-3, 14) | I64, min_size=0, max_size=6) | cuts, label="offsets"
    )
    t = np.array(tokens, dtype=np.int64)
    o = np.array(offsets, dtype=np.int64)
    valid_offsets = (
        len(o) >= 2
        and o[0] == 0
        and o[-1] == len(t)
        and all(int(o[k + 1]) > int(o[k]) for k in range(len(o) - 1))
    )
    seqs = [t[o[k] : o[k + 1]].tolist() for k in range(len(o) - 1)] if valid_offsets else []
    valid = valid_offsets and all(x >= 0 and (vocab is None or x < vocab) for x in t.tolist())
    try:
        trie = ItemTrie.from_flat(t, o, vocab_size=vocab)
    except TrieError:
        assert not valid
        return
    assert valid
    count("trie:from_flat-built")
    ref = RefTrie(seqs, list(range(len(seqs))))
    assert trie.num_nodes == len(ref.nodes)
    for k, s in enumerate(seqs):
        assert k in trie.items(trie.walk(s)).tolist()

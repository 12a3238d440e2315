"""ItemTrie (C++) and DeviceTrie against a plain Python dict trie; bad input."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from latentr3_fast import _C
from latentr3_fast.decode import DeviceTrie, ItemTrie
from latentr3_fast.errors import LatentR3Error, TrieError


class DictTrie:
    """Reference: nested dicts; key None holds the item ids ending at that node."""

    def __init__(self, seqs, ids):
        self.root = {}
        for seq, i in zip(seqs, ids):
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})
            node.setdefault(None, []).append(i)

    def node(self, prefix):
        node = self.root
        for t in prefix:
            node = node[t]
        return node

    def prefixes(self):
        out, stack = [], [((), self.root)]
        while stack:
            p, n = stack.pop()
            out.append(p)
            stack.extend((p + (t,), c) for t, c in n.items() if t is not None)
        return out


def random_catalogue(rng: random.Random, n: int, vocab: int, max_len: int, dup_rate=0.2):
    seqs = []
    for _ in range(n):
        if seqs and rng.random() < dup_rate:
            base = list(rng.choice(seqs))
            if rng.random() < 0.5:  # exact duplicate, else shared prefix
                seqs.append(base)
                continue
            cut = rng.randint(1, len(base))
            seqs.append(base[:cut] + [rng.randrange(vocab) for _ in range(rng.randint(1, 3))])
            continue
        seqs.append([rng.randrange(vocab) for _ in range(rng.randint(1, max_len))])
    ids = list(range(n))
    rng.shuffle(ids)
    return seqs, ids


def state_of(trie: ItemTrie, prefix) -> int:
    return trie.walk(list(prefix)) if prefix else trie.root()


def test_small_hand_built():
    seqs = [[5, 2, 9], [5, 2, 7], [5, 2, 9], [3]]
    t = ItemTrie(seqs, [10, 11, 12, 13])
    # nodes: root, 3, 5, 5-2, 5-2-7, 5-2-9  -> 6
    assert t.num_nodes == 6 and t.num_edges == 5 and t.num_items == 4 and len(t) == 4
    assert t.max_depth == 3 and t.max_children == 2 and t.root() == 0
    off, tok = t.allowed([0])
    assert off.tolist() == [0, 2] and tok.tolist() == [3, 5]  # sorted by token id
    s = t.walk([5, 2])
    off, tok, ch = t.allowed([s, 0], return_children=True)
    assert off.tolist() == [0, 2, 4] and tok.tolist() == [7, 9, 3, 5]
    assert t.advance([s, s], [7, 9]).tolist() == ch[:2].tolist()
    leaf9 = t.walk([5, 2, 9])
    assert t.items(leaf9).tolist() == [10, 12]  # duplicates share a terminal, input order
    assert t.items(t.walk([5, 2, 7])).tolist() == [11]
    assert t.items(t.walk([3])).tolist() == [13]
    assert t.items(s).tolist() == []
    assert t.is_terminal([0, s, leaf9]).tolist() == [False, False, True]
    assert t.depth([0, s, leaf9]).tolist() == [0, 2, 3]
    assert "num_items=4" in repr(t)


def test_prefix_sequence_is_terminal_inner_node():
    t = ItemTrie([[1, 2], [1, 2, 3]])
    s = t.walk([1, 2])
    assert t.is_terminal([s]).tolist() == [True]
    assert t.allowed([s])[1].tolist() == [3]
    assert t.items(s).tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
def test_random_tries_match_dict_reference(seed):
    rng = random.Random(seed)
    vocab = [3, 17, 1000][seed % 3]
    seqs, ids = random_catalogue(rng, rng.randint(1, 300), vocab, rng.randint(1, 9))
    t = ItemTrie(seqs, ids, vocab_size=vocab)
    ref = DictTrie(seqs, ids)
    prefixes = ref.prefixes()
    assert t.num_nodes == len(prefixes)
    assert t.max_depth == max(len(s) for s in seqs)
    states = np.array([state_of(t, p) for p in prefixes])
    assert len(set(states.tolist())) == len(prefixes)  # distinct prefixes, distinct nodes
    off, tok, ch = t.allowed(states, return_children=True)
    for i, p in enumerate(prefixes):
        node = ref.node(p)
        want = sorted(k for k in node if k is not None)
        assert tok[off[i] : off[i + 1]].tolist() == want
        assert ch[off[i] : off[i + 1]].tolist() == [state_of(t, p + (k,)) for k in want]
        assert t.items(states[i]).tolist() == node.get(None, [])
    assert t.is_terminal(states).tolist() == [None in ref.node(p) for p in prefixes]
    assert t.depth(states).tolist() == [len(p) for p in prefixes]
    # padded form agrees with the CSR form
    ptok, pch = t.allowed_padded(states)
    for i in range(len(states)):
        n = off[i + 1] - off[i]
        assert ptok[i, :n].tolist() == tok[off[i] : off[i + 1]].tolist()
        assert pch[i, :n].tolist() == ch[off[i] : off[i + 1]].tolist()
        assert (ptok[i, n:] == -1).all() and (pch[i, n:] == -1).all()


def test_to_csr_is_consistent():
    rng = random.Random(7)
    seqs, ids = random_catalogue(rng, 200, 50, 6)
    t = ItemTrie(seqs, ids)
    c = t.to_csr()
    n = t.num_nodes
    assert c["child_offsets"].shape == (n + 1,) and c["item_offsets"].shape == (n + 1,)
    assert c["child_offsets"][-1] == t.num_edges == n - 1
    assert sorted(c["item_ids"].tolist()) == sorted(ids)
    for v in range(n):
        b, e = c["child_offsets"][v], c["child_offsets"][v + 1]
        assert np.all(np.diff(c["child_tokens"][b:e]) > 0)
        for tok, child in zip(c["child_tokens"][b:e], c["child_nodes"][b:e]):
            assert c["parents"][child] == v and c["parent_tokens"][child] == tok
            assert c["depths"][child] == c["depths"][v] + 1
    with pytest.raises(ValueError):  # exported arrays are read-only views of the cache
        c["child_tokens"][0] = 3


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "numpy32", "flat"])
def test_input_kinds_give_the_same_trie(kind):
    seqs = [[4, 1], [4, 2, 2], [0]]
    if kind == "list":
        t = ItemTrie(seqs, [2, 0, 1])
    elif kind == "numpy":
        t = ItemTrie([np.array(s) for s in seqs], np.array([2, 0, 1]))
    elif kind == "numpy32":
        t = ItemTrie([np.array(s, dtype=np.int32) for s in seqs], np.array([2, 0, 1], np.uint8))
    elif kind == "torch":
        t = ItemTrie([torch.tensor(s) for s in seqs], torch.tensor([2, 0, 1]))
    else:
        t = ItemTrie.from_flat([4, 1, 4, 2, 2, 0], [0, 2, 5, 6], [2, 0, 1])
    ref = ItemTrie(seqs, [2, 0, 1]).to_csr()
    for k, v in t.to_csr().items():
        assert v.tolist() == ref[k].tolist(), k
    s = t.walk(torch.tensor([4, 2]))
    assert t.advance(torch.tensor([s]), np.array([2], np.int16)).tolist() == [t.walk([4, 2, 2])]


def test_default_item_ids_and_pickle():
    t = ItemTrie([[1], [2], [1]])
    assert t.items(t.walk([1])).tolist() == [0, 2]
    t.titles = ["a", "b", "a"]
    u = pickle.loads(pickle.dumps(t))
    assert u.titles == ["a", "b", "a"]
    for k, v in u.to_csr().items():
        assert v.tolist() == t.to_csr()[k].tolist()


def test_empty_query_batches():
    t = ItemTrie([[1, 2]])
    off, tok = t.allowed([])
    assert off.tolist() == [0] and tok.tolist() == []
    assert t.advance([], []).tolist() == []
    assert t.is_terminal(np.zeros(0, np.int64)).tolist() == []


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([[1, 2], []],), "sequence 1.*empty"),
        (([],), "at least one sequence"),
        (([[1, -3]],), "token id -3"),
        (([[1, 7]], None, 5), "token id 7.*out of range"),
        (([[1], [2]], [0, -1]), "negative item id"),
        (([[1], [2]], [3, 3]), "item id 3 appears more than once"),
        (([[1], [2]], [0]), "item_ids has 1 entries"),
        (([[1, 2.5]],), r"sequences\[0\]\[1\]"),
        (([[1], "ab"],), r"sequences\[1\]"),
        (([[1]], [0.0]), "item_ids: expected integer"),
        (([np.array([[1, 2]])],), "1-D"),
        (([[1]], None, 0), "vocab_size must be positive"),
        (([torch.tensor([1.0])],), "dtype"),
    ],
)
def test_bad_build_input_raises_trie_error(args, match):
    with pytest.raises(TrieError, match=match) as ei:
        ItemTrie(*args)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, LatentR3Error)


def test_bad_flat_input():
    with pytest.raises(TrieError, match="offsets"):
        ItemTrie.from_flat([1, 2], [0, 1, 3])  # last offset beyond the tokens
    with pytest.raises(TrieError, match="non-decreasing"):
        ItemTrie.from_flat([1, 2], [0, 2, 1, 2])  # decreasing offsets
    with pytest.raises(TrieError, match="sequence 1 .*empty"):
        ItemTrie.from_flat([1, 2], [0, 2, 2])
    with pytest.raises(TrieError, match="at least one"):
        ItemTrie.from_flat([], [])


def test_bad_query_input_raises_trie_error():
    t = ItemTrie([[1, 2], [1, 3]])
    with pytest.raises(TrieError, match=r"state 99 at states\[1\]"):
        t.allowed([0, 99])
    with pytest.raises(TrieError, match="state -1"):
        t.is_terminal([-1])
    with pytest.raises(TrieError, match="no edge with token 5 from state 0"):
        t.advance([0], [5])
    assert t.advance([0, 0], [5, 1], strict=False).tolist() == [-1, t.walk([1])]
    assert t.walk([1, 9], strict=False) == -1
    with pytest.raises(TrieError, match="2 entries but tokens has 1"):
        t.advance([0, 0], [1])
    with pytest.raises(TrieError, match="out of range"):
        t.items(t.num_nodes)
    with pytest.raises(TrieError, match="expected an int"):
        t.items(1.0)
    with pytest.raises(TrieError, match="dtype"):
        t.allowed(np.array([0.0]))
    with pytest.raises(TrieError, match="1-D"):
        t.depth(np.zeros((2, 2), np.int64))
    with pytest.raises(TrieError, match="more than width"):
        t.allowed_padded([t.walk([1])], width=1)
    # the raw extension raises its own ValueError subclass
    with pytest.raises(_C.TrieError):
        _C.ItemTrie(np.array([], np.int64), np.array([0, 0]), np.array([0]), 0)


# --------------------------------------------------------------------------- DeviceTrie
@pytest.mark.parametrize("seed", range(4))
def test_device_trie_equals_cpp_trie(seed):
    rng = random.Random(100 + seed)
    seqs, ids = random_catalogue(rng, rng.randint(1, 200), rng.choice([5, 300]), 7)
    t = ItemTrie(seqs, ids)
    d = t.to_device("cpu")
    assert isinstance(d, DeviceTrie) and t.to_device("cpu") is d  # cached
    assert (d.num_nodes, d.num_items, d.max_depth) == (t.num_nodes, t.num_items, t.max_depth)
    states = np.array(sorted({rng.randrange(t.num_nodes) for _ in range(60)}))
    for a, b in zip(t.allowed(states, True), d.allowed(torch.from_numpy(states), True)):
        assert a.tolist() == b.tolist()
    assert t.is_terminal(states).tolist() == d.is_terminal(states).tolist()
    assert t.depth(states).tolist() == d.depth(states).tolist()
    for s in states[:10]:
        assert t.items(s).tolist() == d.items(s).tolist()
    # padded queries per depth: the width bound from depth_width suffices
    c = t.to_csr()
    for depth in range(t.max_depth + 1):
        at = np.nonzero(c["depths"] == depth)[0]
        ptok, pch = d.allowed_padded(torch.from_numpy(at), d.depth_width[depth])
        rtok, rch = t.allowed_padded(at, d.depth_width[depth])
        assert ptok.tolist() == rtok.tolist() and pch.tolist() == rch.tolist()
    # advance: every edge, plus misses (absent token, token beyond the vocabulary, negative)
    off, tok, ch = t.allowed(states, True)
    rows = np.repeat(states, np.diff(off))
    assert d.advance(torch.from_numpy(rows), torch.from_numpy(tok)).tolist() == ch.tolist()
    miss_tok = torch.tensor([10**6, -2, 4])
    want = t.advance(np.zeros(3, np.int64), miss_tok.clamp(min=0).numpy(), strict=False)
    want[1] = -1
    assert d.advance(torch.zeros(3, dtype=torch.long), miss_tok, strict=False).tolist() == list(
        want
    )
    first = d.first_item(torch.from_numpy(states))
    for s, f in zip(states, first.tolist()):
        items = t.items(s).tolist()
        assert f == (items[0] if items else -1)


def test_device_trie_bad_input():
    d = ItemTrie([[1, 2], [1, 3]]).to_device("cpu")
    with pytest.raises(TrieError, match="no edge with token 7"):
        d.advance(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(TrieError, match="state 9"):
        d.allowed(torch.tensor([0, 9]))
    with pytest.raises(TrieError, match="shape"):
        d.advance(torch.tensor([0, 0]), torch.tensor([1]))
    with pytest.raises(TrieError, match="dtype"):
        d.is_terminal(torch.tensor([0.5]))
    with pytest.raises(TrieError, match="out of range"):
        d.items(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_trie_on_cuda_matches():
    t = ItemTrie([[1, 2], [1, 3], [4]])
    d = t.to_device("cuda")
    off, tok = d.allowed(torch.tensor([0, 1], device="cuda"))
    assert off.is_cuda and tok.tolist() == t.allowed([0, 1])[1].tolist()


# --------------------------------------------------------------------------- from_catalog
def test_from_catalog_uses_target_ids_and_groups_duplicate_titles():
    from latentr3_fast.data import ItemCatalog, PromptBuilder, train_tokenizer

    titles = ["Greatest Hits", "Blue Train", "Greatest Hits", "Kind of Blue", 'A "quoted" one']
    tok = train_tokenizer(titles * 3, vocab_size=300)
    pb = PromptBuilder(tok, "CDs_and_Vinyl")
    trie = ItemTrie.from_catalog(ItemCatalog(titles), pb)
    assert trie.titles == titles and trie.num_items == len(titles)
    assert trie.vocab_size == len(tok)
    for i, title in enumerate(titles):
        seq = pb.target_ids(title)
        assert seq[-1] == tok.eos_token_id
        # the sequence is the tokenization of the whole target string: '"' + title + '"\n'
        assert tok.decode(seq[:-1]) == f'"{title}"\n'
        leaf = trie.walk(seq)
        assert i in trie.items(leaf).tolist()
    assert trie.items(trie.walk(pb.target_ids("Greatest Hits"))).tolist() == [0, 2]


def test_real_catalogue_trie(shared_data):
    """CDs_and_Vinyl titles: every item reaches a terminal holding it; duplicates share."""
    from latentr3_fast.data import ItemCatalog, PromptBuilder, train_tokenizer
    from latentr3_fast.data.layout import read_info

    info = sorted((shared_data / "CDs_and_Vinyl" / "info").glob("*.txt"))
    if not info:
        pytest.skip("CDs_and_Vinyl info file absent")
    titles = read_info(info[0])
    tok = train_tokenizer(titles[:2000], vocab_size=1024)
    pb = PromptBuilder(tok, "CDs_and_Vinyl")
    cat = ItemCatalog(titles)
    trie = ItemTrie.from_catalog(cat, pb)
    assert trie.num_items == len(titles)
    csr = trie.to_csr()
    n_terminal = int((np.diff(csr["item_offsets"]) > 0).sum())
    assert n_terminal == len(set(titles))
    for i in range(0, len(titles), 97):
        assert trie.items(trie.walk(pb.target_ids(titles[i]))).tolist() == cat.ids(titles[i])


@pytest.mark.parametrize("bad", [[[0]], [2**64], [True], [np.bool_(True)], [1, None]], ids=str)
def test_non_int_tokens_rejected_with_position(bad):
    with pytest.raises(TrieError, match=r"sequences\[1\]\[\d\]"):
        ItemTrie([[1, 2], bad])


def test_int64_edge_values():
    big = 2**63 - 1
    with pytest.raises(TrieError, match="out of range"):  # fits int64 but beyond the vocab
        ItemTrie([[1, big]], vocab_size=10)
    t = ItemTrie([[1, big]])  # no vocabulary bound: any non-negative int64 is a token
    assert t.allowed([t.walk([1])])[1].tolist() == [big]


@pytest.mark.parametrize("offsets", [[0, 1 << 40, 3], [0, 2, 1, 3], [0, -1, 3], [0, 1, 4]], ids=str)
def test_bad_offsets_rejected_before_reading_tokens(offsets):
    with pytest.raises(TrieError, match="offset"):
        ItemTrie.from_flat(np.array([1, 2, 3]), np.array(offsets))


def test_device_trie_query_checks_states():
    d = ItemTrie([[1, 2], [1, 3]]).to_device("cpu")
    for bad in (-1, d.num_nodes):
        with pytest.raises(TrieError, match="state"):
            d.is_terminal(torch.tensor([bad]))
        with pytest.raises(TrieError, match="state"):
            d.depth(torch.tensor([bad]))
        with pytest.raises(TrieError, match="state"):
            d.allowed_padded(torch.tensor([bad]), 2, check=True)

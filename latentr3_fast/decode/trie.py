"""The item trie: a thin wrapper over the C++ CSR trie, plus a device-resident twin.

Every item's target string (``"`` + title + ``"\\n`` + EOS, tokenized as the training target)
is one path from the root; duplicate sequences share a path and their terminal maps to all
their item ids. States are int64 node ids; the root is 0.

``ItemTrie`` answers batched queries on the host (numpy in, numpy out, GIL released in C++).
``DeviceTrie`` holds the same CSR arrays as torch tensors on any device and answers the same
queries with tensor ops only (no host round trip), so constrained beam search can run entirely
on the accelerator.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from latentr3_fast import _C
from latentr3_fast.errors import TrieError

__all__ = ["DeviceTrie", "ItemTrie"]


def _as_int64(x: Any, arg: str) -> np.ndarray:
    """Converts lists / numpy / torch integer input to a contiguous 1-D int64 array."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TrieError(f"{arg}: expected integer ids, got a tensor of dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TrieError(f"{arg}: expected integer ids, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise TrieError(f"{arg}: expected a 1-D sequence of ids, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise TrieError(f"{arg}: id {int(arr.max())} does not fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _call(fn, *args, **kwargs):
    """Runs a C++ call, re-raising its ValueError subclass as the package's TrieError."""
    try:
        return fn(*args, **kwargs)
    except _C.TrieError as e:
        raise TrieError(str(e)) from None


_INT_TYPES = (int, np.integer)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _bad_token(seq: Sequence[Any]) -> tuple[int, Any] | None:
    """First element that is not an int64-representable integer (bools are rejected)."""
    for j, t in enumerate(seq):
        if (
            isinstance(t, (bool, np.bool_))
            or not isinstance(t, _INT_TYPES)
            or not _I64_MIN <= int(t) <= _I64_MAX
        ):
            return j, t
    return None


def _flatten(sequences: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """list of id sequences -> (tokens [total] int64, offsets [n+1] int64)."""
    seqs = []
    for i, s in enumerate(sequences):
        if isinstance(s, (torch.Tensor, np.ndarray)):
            s = _as_int64(s, f"sequences[{i}]")
        elif isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise TrieError(f"sequences[{i}]: expected a sequence of token ids, got {type(s)}")
        seqs.append(s)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_list = list(itertools.chain.from_iterable(seqs))
    # one C-speed pass over the element types; the slow per-element scan runs only on error
    types = set(map(type, flat_list))
    flat = None
    if all(issubclass(t, _INT_TYPES) and not issubclass(t, (bool, np.bool_)) for t in types):
        try:
            flat = np.array(flat_list, dtype=np.int64)
        except OverflowError:
            flat = None
    if flat is None:
        for i, s in enumerate(seqs):
            if isinstance(s, np.ndarray):
                continue
            bad = _bad_token(s)
            if bad is not None:
                raise TrieError(
                    f"sequences[{i}][{bad[0]}]: expected an integer token id in int64 range, "
                    f"got {bad[1]!r}"
                )
        raise TrieError("sequences: token ids are not all int64 integers")  # pragma: no cover
    return flat, offsets


class ItemTrie:
    """Prefix tree over item token sequences (C++ CSR arrays; batched numpy queries).

    Args:
        sequences: n token-id sequences (lists, numpy or torch int arrays), one per item.
        item_ids: n distinct non-negative item ids (default ``range(n)``).
        vocab_size: optional bound; token ids must lie in ``[0, vocab_size)``.

    Raises:
        TrieError: empty sequence, negative or out-of-range ids, duplicate item ids,
            mismatched lengths.
    """

    titles: list[str] | None = None  # set by from_catalog: titles[i] of item id i

    def __init__(
        self,
        sequences: Iterable[Any],
        item_ids: Any = None,
        vocab_size: int | None = None,
    ) -> None:
        tokens, offsets = _flatten(sequences)
        n = len(offsets) - 1
        ids = np.arange(n, dtype=np.int64) if item_ids is None else _as_int64(item_ids, "item_ids")
        if len(ids) != n:
            raise TrieError(f"item_ids has {len(ids)} entries but there are {n} sequences")
        self._init_flat(tokens, offsets, ids, vocab_size)

    def _init_flat(
        self, tokens: np.ndarray, offsets: np.ndarray, ids: np.ndarray, vocab_size: int | None
    ) -> None:
        if vocab_size is not None and int(vocab_size) <= 0:
            raise TrieError(f"vocab_size must be positive, got {vocab_size}")
        self._t = _call(_C.ItemTrie, tokens, offsets, ids, int(vocab_size or 0))
        self._flat = (tokens, offsets, ids, vocab_size)
        self._csr: dict[str, np.ndarray] | None = None
        self._device_cache: dict[str, DeviceTrie] = {}

    @classmethod
    def from_flat(
        cls, tokens: Any, offsets: Any, item_ids: Any = None, vocab_size: int | None = None
    ) -> ItemTrie:
        """Builds from concatenated tokens [total] and offsets [n+1] (the fastest way in)."""
        t, o = _as_int64(tokens, "tokens"), _as_int64(offsets, "offsets")
        n = len(o) - 1
        if n < 0:
            raise TrieError("offsets must have at least one entry")
        ids = np.arange(n, dtype=np.int64) if item_ids is None else _as_int64(item_ids, "item_ids")
        self = cls.__new__(cls)
        self._init_flat(t, o, ids, vocab_size)
        return self

    @classmethod
    def from_catalog(
        cls, catalog: Any, prompt_builder: Any, vocab_size: int | None = None
    ) -> ItemTrie:
        """Trie over ``prompt_builder.target_ids(title)`` of every item of an ``ItemCatalog``.

        Items with the same title (hence the same sequence) share one terminal that maps to
        all their ids.
        """
        titles = list(catalog.titles)
        cache: dict[str, list[int]] = {}
        seqs = []
        for title in titles:
            seq = cache.get(title)
            if seq is None:
                seq = cache[title] = list(prompt_builder.target_ids(title))
            seqs.append(seq)
        if vocab_size is None:
            tok = getattr(prompt_builder, "tokenizer", None)
            vocab_size = len(tok) if tok is not None else None
        trie = cls(seqs, np.arange(len(titles), dtype=np.int64), vocab_size=vocab_size)
        trie.titles = titles
        return trie

    def __reduce__(self):
        tokens, offsets, ids, vocab_size = self._flat
        return (_rebuild, (tokens, offsets, ids, vocab_size, self.titles))

    # sizes ---------------------------------------------------------------------------------
    def root(self) -> int:
        """The root state (0)."""
        return 0

    @property
    def num_nodes(self) -> int:
        """Nodes including the root (node ids are ``0 .. num_nodes - 1``, in preorder)."""
        return self._t.num_nodes

    @property
    def num_edges(self) -> int:
        """Parent -> child token edges (``num_nodes - 1``)."""
        return self._t.num_edges

    @property
    def num_items(self) -> int:
        """Catalogue items (sequences) inserted, duplicates included."""
        return self._t.num_items

    @property
    def max_depth(self) -> int:
        """Length of the longest sequence."""
        return self._t.max_depth

    @property
    def max_children(self) -> int:
        """The widest node's number of children."""
        return self._t.max_children

    @property
    def vocab_size(self) -> int | None:
        """Token ids must be below it (None: not checked)."""
        return self._t.vocab_size or None

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (
            f"ItemTrie(num_items={self.num_items}, num_nodes={self.num_nodes}, "
            f"max_depth={self.max_depth})"
        )

    # batched queries -----------------------------------------------------------------------
    def allowed(self, states: Any, return_children: bool = False) -> tuple[np.ndarray, ...]:
        """Allowed next tokens of every state, as CSR.

        Args:
            states: [n] int node ids.
        Returns:
            offsets [n+1], tokens [offsets[-1]] (sorted per state), and with
            ``return_children`` the child node ids [offsets[-1]].
        """
        return _call(self._t.allowed, _as_int64(states, "states"), return_children)

    def allowed_padded(self, states: Any, width: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Allowed tokens and child nodes, [n, width] each, padded with -1.

        ``width=-1`` uses the largest child count among ``states``.
        """
        return _call(self._t.allowed_padded, _as_int64(states, "states"), int(width))

    def advance(self, states: Any, tokens: Any, strict: bool = True) -> np.ndarray:
        """Child of ``states[i]`` along ``tokens[i]`` -> [n] states.

        A missing edge raises TrieError, or gives -1 when ``strict=False``.
        """
        return _call(
            self._t.advance, _as_int64(states, "states"), _as_int64(tokens, "tokens"), strict
        )

    def is_terminal(self, states: Any) -> np.ndarray:
        """[n] bool: some item's sequence ends at the state."""
        return _call(self._t.is_terminal, _as_int64(states, "states"))

    def depth(self, states: Any) -> np.ndarray:
        """[n] number of tokens from the root to each state."""
        return _call(self._t.depth, _as_int64(states, "states"))

    def items(self, state: int) -> np.ndarray:
        """Item ids whose sequence ends at ``state`` (input order; empty if not terminal)."""
        if isinstance(state, (bool, np.bool_)) or not isinstance(state, (int, np.integer)):
            raise TrieError(f"state: expected an int, got {state!r}")
        return _call(self._t.items, int(state))

    def walk(self, tokens: Sequence[int], strict: bool = True) -> int:
        """State reached from the root along ``tokens`` (-1 if missing and not strict)."""
        state = 0
        for tok in _as_int64(tokens, "tokens"):
            state = int(self.advance([state], [tok], strict=strict)[0])
            if state < 0:
                return -1
        return state

    def to_csr(self) -> dict[str, np.ndarray]:
        """The flat arrays (read-only copies): child_offsets [N+1], child_tokens [E],
        child_nodes [E], item_offsets [N+1], item_ids [I], parents [N], parent_tokens [N],
        depths [N]."""
        if self._csr is None:
            csr = self._t.to_csr()
            for a in csr.values():
                a.setflags(write=False)
            self._csr = csr
        return dict(self._csr)

    def to_device(self, device: str | torch.device) -> DeviceTrie:
        """The device-resident twin on ``device`` (cached per device)."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = DeviceTrie(self, device)
        return self._device_cache[key]


def _rebuild(tokens, offsets, ids, vocab_size, titles) -> ItemTrie:
    trie = ItemTrie.from_flat(tokens, offsets, ids, vocab_size)
    trie.titles = titles
    return trie


class DeviceTrie:
    """The CSR trie as torch tensors on ``device``; queries are tensor ops without host sync.

    Transitions use one ``searchsorted`` over edge keys ``parent * K + token`` (edges are
    stored by parent, then token, so the keys are globally sorted).
    """

    def __init__(self, trie: ItemTrie, device: str | torch.device = "cpu") -> None:
        csr = trie.to_csr()
        dev = torch.device(device)
        self.device = dev
        self.num_nodes = trie.num_nodes
        self.num_items = trie.num_items
        self.max_depth = trie.max_depth
        self.max_children = trie.max_children

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a, dtype=np.int64)).to(dev)

        co = csr["child_offsets"]
        self.child_offsets = t(co)
        self.child_tokens = t(csr["child_tokens"])
        self.child_nodes = t(csr["child_nodes"])
        self.item_offsets = t(csr["item_offsets"])
        self.item_ids = t(csr["item_ids"])
        self.depths = t(csr["depths"])
        self.terminal = (self.item_offsets[1:] > self.item_offsets[:-1]).contiguous()
        ct = csr["child_tokens"]
        self._key_base = int(ct.max()) + 1 if len(ct) else 1
        edge_parent = np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(co))
        self._edge_keys = t(edge_parent * self._key_base + ct)
        # Widest node per depth: at decoding step d every beam sits at depth d, so this bounds
        # the padded width without reading the states back to the host.
        counts = np.diff(co)
        depth_width = np.zeros(self.max_depth + 1, dtype=np.int64)
        np.maximum.at(depth_width, csr["depths"], counts)
        self.depth_width = depth_width.tolist()

    def root(self) -> int:
        return 0

    def _states(self, states: Any) -> torch.Tensor:
        if not isinstance(states, torch.Tensor):
            states = torch.as_tensor(_as_int64(states, "states"))
        elif states.dtype.is_floating_point or states.dtype == torch.bool:
            raise TrieError(f"states: expected integer ids, got a tensor of dtype {states.dtype}")
        return states.to(self.device, torch.int64)

    def check_states(self, states: torch.Tensor, arg: str = "states") -> None:
        """Raises TrieError if any state is out of range (this one syncs with the host)."""
        bad = (states < 0) | (states >= self.num_nodes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise TrieError(
                f"DeviceTrie: state {int(states.reshape(-1)[i])} at {arg}[{i}] is out of "
                f"range [0, {self.num_nodes})"
            )

    def num_allowed(self, states: torch.Tensor) -> torch.Tensor:
        """[n] child counts."""
        return self.child_offsets[states + 1] - self.child_offsets[states]

    def allowed(self, states: Any, return_children: bool = False) -> tuple[torch.Tensor, ...]:
        """Same CSR result as ``ItemTrie.allowed`` as tensors (one sync for the total size)."""
        s = self._states(states)
        self.check_states(s)
        counts = self.num_allowed(s)
        offsets = torch.zeros(len(s) + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        total = int(offsets[-1])
        row = torch.repeat_interleave(
            torch.arange(len(s), device=self.device), counts, 0, output_size=total
        )
        edge = self.child_offsets[s][row] + torch.arange(total, device=self.device) - offsets[row]
        out = (offsets, self.child_tokens[edge])
        return (*out, self.child_nodes[edge]) if return_children else out

    def allowed_padded(
        self, states: Any, width: int, check: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed tokens and child nodes [n, width], padded with -1; no host sync.

        The decoding hot path: states are trusted unless ``check`` (one host sync).
        ``width`` must be >= every state's child count (e.g. ``depth_width[d]``); extra
        children would be silently cut, so callers pass a bound known from the trie.
        """
        s = self._states(states)
        if check:
            self.check_states(s)
        start = self.child_offsets[s].unsqueeze(1)
        count = self.num_allowed(s).unsqueeze(1)
        ar = torch.arange(width, device=self.device).unsqueeze(0)
        valid = ar < count
        edge = torch.where(valid, start + ar, torch.zeros_like(start))
        # a trie always has >= 1 edge (sequences are non-empty), so edge 0 is a safe dummy
        return torch.where(valid, self.child_tokens[edge], -1), torch.where(
            valid, self.child_nodes[edge], -1
        )

    def advance(self, states: Any, tokens: Any, strict: bool = True) -> torch.Tensor:
        """Child along each token; -1 on a missing edge (or TrieError when strict, which syncs)."""
        s = self._states(states)
        tok = self._states(tokens)
        if s.shape != tok.shape:
            raise TrieError(
                f"DeviceTrie.advance: states has shape {tuple(s.shape)} but tokens has "
                f"{tuple(tok.shape)}"
            )
        if strict:
            self.check_states(s)
        in_range = (tok >= 0) & (tok < self._key_base)
        key = s * self._key_base + tok.clamp(0, self._key_base - 1)
        pos = torch.searchsorted(self._edge_keys, key).clamp(max=len(self._edge_keys) - 1)
        found = in_range & (self._edge_keys[pos] == key)
        out = torch.where(found, self.child_nodes[pos], -1)
        if strict and not bool(found.all()):
            i = int((~found).reshape(-1).nonzero()[0, 0])
            raise TrieError(
                f"DeviceTrie.advance: no edge with token {int(tok.reshape(-1)[i])} from state "
                f"{int(s.reshape(-1)[i])} (at tokens[{i}])"
            )
        return out

    def is_terminal(self, states: Any, check: bool = True) -> torch.Tensor:
        """[n] bool; ``check`` validates the states (one host sync)."""
        s = self._states(states)
        if check:
            self.check_states(s)
        return self.terminal[s]

    def depth(self, states: Any, check: bool = True) -> torch.Tensor:
        """[n] depth of each state; ``check`` validates the states (one host sync)."""
        s = self._states(states)
        if check:
            self.check_states(s)
        return self.depths[s]

    def items(self, state: int) -> torch.Tensor:
        s = int(state)
        if not 0 <= s < self.num_nodes:
            raise TrieError(f"DeviceTrie: state {s} is out of range [0, {self.num_nodes})")
        return self.item_ids[int(self.item_offsets[s]) : int(self.item_offsets[s + 1])]

    def first_item(self, states: torch.Tensor) -> torch.Tensor:
        """[n] the first item id of each terminal state (-1 where not terminal); no sync."""
        term = self.terminal[states]
        first = self.item_ids[self.item_offsets[states].clamp(max=max(self.num_items - 1, 0))]
        return torch.where(term, first, -1)

"""Trie build and query benchmark: 100k items x 12 tokens (issue target: build < 1 s).

    python bench/bench_trie.py [--items 100000] [--len 12] [--vocab 151643] [--out PATH]

Prints the C++ build time from flat arrays, the wrapper build time from Python lists, the
batched query throughput (allowed / advance on 640 states = 64 prompts x 10 beams) on the
host and with the device-resident trie, and checks both agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from latentr3_fast.decode import ItemTrie

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def make_catalogue(num_items: int, length: int, vocab: int, seed: int = 0):
    """Random item sequences with realistic shared prefixes (a few hundred first tokens)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, size=(num_items, length), dtype=np.int64)
    toks[:, 0] = rng.integers(0, 300, size=num_items)  # '"' merged with the title start
    toks[:, 1] = rng.integers(0, 3000, size=num_items)
    toks[:, -1] = 0  # EOS
    return toks


def timed(fn, repeat: int = 5) -> float:
    """Best of ``repeat`` calls, seconds (no warm-up: the first build is a real one too)."""
    return harness.time_call(fn, reps=repeat, warmup=0).min_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--len", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=151_643)
    ap.add_argument("--states", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    toks = make_catalogue(args.items, args.len, args.vocab)
    flat = toks.reshape(-1)
    offsets = np.arange(0, flat.size + 1, args.len, dtype=np.int64)
    lists = toks.tolist()

    t_flat = timed(lambda: ItemTrie.from_flat(flat, offsets))
    t_list = timed(lambda: ItemTrie(lists), repeat=3)
    trie = ItemTrie.from_flat(flat, offsets)
    print(
        f"build {args.items} x {args.len}: C++ from flat arrays {t_flat * 1e3:.1f} ms, "
        f"from Python lists {t_list * 1e3:.1f} ms  ({trie.num_nodes} nodes)"
    )

    rng = np.random.default_rng(1)
    depths = trie.to_csr()["depths"]
    states = rng.choice(np.flatnonzero(depths == 2), size=args.states)
    n = 2000
    t_allowed = timed(lambda: [trie.allowed(states) for _ in range(n)], 1) / n
    _, tok, ch = trie.allowed(states, True)
    off = trie.allowed(states)[0]
    rows = np.repeat(states, np.diff(off))
    t_adv = timed(lambda: [trie.advance(rows, tok) for _ in range(n)], 1) / n
    print(
        f"host: allowed({args.states} states) {t_allowed * 1e6:.1f} us, "
        f"advance({len(rows)} edges) {t_adv * 1e6:.1f} us"
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = trie.to_device(dev)
    s_t = torch.from_numpy(states).to(dev)
    r_t, k_t = torch.from_numpy(rows).to(dev), torch.from_numpy(tok).to(dev)
    w = d.depth_width[2]

    def dev_step():
        d.allowed_padded(s_t, w)
        d.advance(r_t, k_t, strict=False)
        if dev == "cuda":
            torch.cuda.synchronize()

    t_dev = timed(lambda: [dev_step() for _ in range(200)], 1) / 200
    assert d.advance(r_t, k_t).cpu().tolist() == ch.tolist()
    print(f"device ({dev}): allowed_padded + advance {t_dev * 1e6:.1f} us per step; agrees")
    row = dict(items=args.items, length=args.len, nodes=trie.num_nodes, build_flat_s=t_flat,
               build_lists_s=t_list, host_allowed_s=t_allowed, host_advance_s=t_adv,
               device=dev, device_step_s=t_dev)  # fmt: skip
    harness.write_results(args.out, "bench_trie", [row], config=vars(args), device=dev)


if __name__ == "__main__":
    main()

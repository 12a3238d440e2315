"""Write a standard-layout dataset (``DIR/{train,valid,test}/NAME.csv`` + ``info``) as RecBole
atomic files ``OUT/NAME.inter`` + ``OUT/NAME.item``, to measure the RecBole path on real data.

The standard files hold samples, not interactions, and the rebuilt train files of
``../shared/data`` have placeholder users and no timestamps. Users are therefore rebuilt by
chaining: a row whose history equals the last <= 10 items of an open chain continues that
chain; otherwise it starts a new "user" whose history items come first. Timestamps are the
row's global index over train+valid+test (the files are sorted by time), so the RecBole loader's
global temporal 80/10/10 split keeps the original order. Item tokens are ``i<id>``.

    python bench/standard_to_recbole.py ../shared/data/Movies_and_TV_2017 /tmp/rb Movies_and_TV
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    from latentr3_fast.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="standard-layout directory")
    ap.add_argument("out", help="output directory")
    ap.add_argument("name", help="RecBole dataset name (file stem)")
    args = ap.parse_args()
    ds = load_dataset(args.src)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chains: dict[tuple[int, ...], int] = {}  # last <= 10 items -> user
    inter: list[tuple[int, str, float]] = []
    users = 0
    rows = [*ds.train, *ds.valid, *ds.test]
    for g, s in enumerate(rows):
        key = tuple(s.history_ids)
        user = chains.pop(key, None)
        if user is None:
            user, users = users, users + 1
            for j, h in enumerate(s.history_ids):  # before the target, in order
                inter.append((user, f"i{h}", g - 1 + j / (len(s.history_ids) + 1)))
            seq = list(s.history_ids)
        else:
            seq = list(key)
        inter.append((user, f"i{s.target_id}", float(g)))
        chains[tuple((seq + [s.target_id])[-10:])] = user
    with (out / f"{args.name}.inter").open("w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, i, t in inter:
            f.write(f"u{u}\t{i}\t{t!r}\n")
    with (out / f"{args.name}.item").open("w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for i, t in enumerate(ds.items.titles):
            f.write(f"i{i}\t{t}\n")
    print(f"{len(rows)} samples -> {users} users, {len(inter)} interactions, {len(ds.items)} items")


if __name__ == "__main__":
    main()

"""SPEC section 1 steps 5-6, shared by the RecBole, raw-Amazon and synthetic builders:
per-user sequences -> samples (history <= 10 previous items) -> global temporal 80/10/10 split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from .records import Sample

__all__ = ["MAX_HISTORY", "sequences_to_samples", "temporal_split"]

MAX_HISTORY = 10
T = TypeVar("T")


def sequences_to_samples(
    sequences: Mapping[str, Sequence[tuple[float, int]]],
    titles: Sequence[str],
    max_history: int = MAX_HISTORY,
) -> list[tuple[float, Sample]]:
    """(target timestamp, sample) for every position i >= 1 of every user's sequence.

    ``sequences[user]`` is a list of ``(timestamp, item_id)``; it is sorted by time here with a
    stable sort (ties keep their input order). Users are visited in sorted id order (as a
    pandas ``groupby`` does), which fixes the order of equal-timestamp samples.
    """
    out: list[tuple[float, Sample]] = []
    for user in sorted(sequences):
        seq = sorted(sequences[user], key=lambda x: x[0])
        ids = [i for _, i in seq]
        for pos in range(1, len(seq)):
            hist = tuple(ids[max(0, pos - max_history) : pos])
            out.append(
                (
                    seq[pos][0],
                    Sample(
                        history_ids=hist,
                        history_titles=tuple(titles[i] for i in hist),
                        target_id=ids[pos],
                        target_title=titles[ids[pos]],
                        user_id=str(user),
                    ),
                )
            )
    return out


def temporal_split(timed: Sequence[tuple[float, T]]) -> tuple[list[T], list[T], list[T]]:
    """Stable sort by target timestamp, then split at ``int(0.8 n)`` and ``int(0.9 n)``."""
    order = sorted(range(len(timed)), key=lambda k: timed[k][0])
    ordered = [timed[k][1] for k in order]
    n = len(ordered)
    a, b = int(0.8 * n), int(0.9 * n)
    return ordered[:a], ordered[a:b], ordered[b:]

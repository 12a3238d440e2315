"""Samples and split of paper App. A, shared by the RecBole, raw-Amazon and synthetic builders:
per-user sequences -> samples (history <= 10 previous items) -> global temporal 80/10/10 split."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from .records import Sample

__all__ = ["MAX_HISTORY", "sequences_to_samples", "temporal_split", "user_windows"]

MAX_HISTORY = 10
Row = TypeVar("Row")  # a Sample, or a raw CSV row dict (raw-Amazon builder)
Event = TypeVar("Event")  # one interaction of a user, e.g. (timestamp, item id)


def user_windows(
    sequences: Mapping[str, Sequence[Event]],
    time: Callable[[Event], float],
    max_history: int = MAX_HISTORY,
) -> Iterator[tuple[str, list[Event], Event]]:
    """``(user, history, target)`` for every position i >= 1 of every user's sequence; the
    history is the previous <= ``max_history`` events, oldest first.

    Each sequence is sorted by ``time`` with a stable sort (ties keep their input order).
    Users are visited in sorted id order (as a pandas ``groupby`` does), which fixes the order
    of equal-timestamp samples.
    """
    for user in sorted(sequences):
        events = sorted(sequences[user], key=time)
        for position in range(1, len(events)):
            yield user, events[max(0, position - max_history) : position], events[position]


def sequences_to_samples(
    sequences: Mapping[str, Sequence[tuple[float, int]]],
    titles: Sequence[str],
    max_history: int = MAX_HISTORY,
) -> list[tuple[float, Sample]]:
    """(target timestamp, sample) for every position i >= 1 of every user's sequence.

    ``sequences[user]`` is a list of ``(timestamp, item_id)``, in any order (see
    :func:`user_windows`).
    """
    out: list[tuple[float, Sample]] = []
    for user, history, (timestamp, target_id) in user_windows(
        sequences, lambda event: event[0], max_history
    ):
        history_ids = tuple(item_id for _, item_id in history)
        sample = Sample(
            history_ids=history_ids,
            history_titles=tuple(titles[i] for i in history_ids),
            target_id=target_id,
            target_title=titles[target_id],
            user_id=str(user),
        )
        out.append((timestamp, sample))
    return out


def temporal_split(
    timed: Sequence[tuple[float, Row]],
) -> tuple[list[Row], list[Row], list[Row]]:
    """Stable sort by target timestamp, then split at ``int(0.8 n)`` and ``int(0.9 n)``."""
    order = sorted(range(len(timed)), key=lambda k: timed[k][0])
    ordered = [timed[k][1] for k in order]
    train_end, valid_end = int(0.8 * len(ordered)), int(0.9 * len(ordered))
    return ordered[:train_end], ordered[train_end:valid_end], ordered[valid_end:]

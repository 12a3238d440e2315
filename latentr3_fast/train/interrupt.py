"""Ctrl-C / SIGTERM that never loses training progress.

The CLI installs :func:`install_handlers`. While a trainer runs its steps inside
:func:`deferred_interrupts`, the first SIGINT/SIGTERM only sets a flag: the trainer finishes
the optimizer step in flight, writes a checkpoint (atomically, as at any save) and raises
:class:`TrainingInterrupted`. A second signal, or one outside a training loop (data loading,
evaluation), raises ``KeyboardInterrupt`` at once. Without the handlers (the Python API),
Python's default behaviour is unchanged.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "TrainingInterrupted",
    "install_handlers",
    "deferred_interrupts",
    "interrupt_requested",
    "honour_interrupt",
]

_active = 0  # depth of deferred_interrupts() blocks
_requested: int | None = None  # the signal number received inside a block
_honoured = False  # a trainer saw the request and is checkpointing before it raises


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by a trainer after it checkpointed on a deferred interrupt; ``str()`` says where."""


def _handler(signum: int, frame: object) -> None:
    global _requested
    if _active and _requested is None and not _honoured:
        _requested = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name}: finishing this training step and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise KeyboardInterrupt


def install_handlers() -> None:
    """Route SIGINT and SIGTERM through the deferral logic (main thread only; else no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within this block a first signal is deferred until the trainer polls
    :func:`interrupt_requested` at a step boundary."""
    global _active, _requested, _honoured
    _active += 1
    pending = None
    try:
        yield
    finally:
        _active -= 1
        if _active == 0:
            pending = _requested if not _honoured else None
            _requested, _honoured = None, False
    if pending is not None:  # arrived after the trainer's last poll: honour it now
        raise KeyboardInterrupt


def honour_interrupt() -> None:
    """Called by a trainer that acts on the request (checkpoint, then TrainingInterrupted):
    a further signal now stops at once."""
    global _honoured
    _honoured = True


def interrupt_requested() -> bool:
    """True when a deferred SIGINT/SIGTERM is waiting to be honoured."""
    return _requested is not None

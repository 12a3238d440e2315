"""The package's own exception types. Every error raised on bad input is one of these."""

from __future__ import annotations


class LatentR3Error(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(LatentR3Error, ValueError):
    """Bad or missing input data; the message names the file, row and column."""


class ConfigError(LatentR3Error, ValueError):
    """An invalid option or combination of options; the message names the option."""


class TrieError(LatentR3Error, ValueError):
    """Bad input to the item trie (empty sequence, id out of range, missing edge)."""


class TrainingError(LatentR3Error, RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); work done so far is kept."""

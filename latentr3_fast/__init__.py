"""latentr3_fast: fast LatentR3 (reinforced latent reasoning for LLM-based recommendation)."""

from __future__ import annotations

from .errors import ConfigError, DataError, LatentR3Error, TrainingError, TrieError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "LatentR3Error",
    "TrainingError",
    "TrieError",
    "__version__",
]

"""latentr3_fast: fast LatentR3 (reinforced latent reasoning for LLM-based recommendation)."""

from __future__ import annotations

import pkgutil

# Run from a source checkout after a regular `pip install .`, this directory shadows the
# installed package, which alone holds the compiled `_C` and `kernels` (installed from
# kernels/). Extending the package path to every `latentr3_fast` directory on sys.path lets
# those submodules load from the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)

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

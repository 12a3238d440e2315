"""Helpers shared by the reliability tests: input counters, hypothesis settings, subprocess
environment. A uniquely named module (not ``conftest``): several test directories have a
conftest.py, so ``from conftest import ...`` picks whichever was imported last when pytest
collects them together.

Every fuzz test calls ``count(name)`` once per generated input and every fault-injection test
``count("faults:<kind>")`` once per injected fault; ``conftest.py`` prints the totals.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COUNTS: Counter[str] = Counter()

# Deterministic by default (a suite must not flake); LATENTR3_FUZZ_EXAMPLES=N and
# LATENTR3_FUZZ_RANDOM=1 turn it into a longer, randomized fuzzing session.
FUZZ_EXAMPLES = int(os.environ.get("LATENTR3_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=os.environ.get("LATENTR3_FUZZ_RANDOM", "0") in ("", "0"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def fuzz(n: int) -> settings:
    """Hypothesis settings with ``n`` examples (or $LATENTR3_FUZZ_EXAMPLES)."""
    return settings(FUZZ, max_examples=FUZZ_EXAMPLES or n)


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` fuzzed inputs / injected faults of ``kind``."""
    COUNTS[kind] += n


def child_env() -> dict[str, str]:
    """Environment for subprocesses: the repo importable, one thread (2 loaded cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env.pop("LATENTR3_KERNELS", None)
    return env


PYTHON = sys.executable

"""Shared pieces of the reliability tests: input counters, hypothesis settings, tiny models.

Every fuzz test calls ``count(name)`` once per generated input and every fault-injection test
``count("faults:<kind>")`` once per injected fault; the totals are printed in pytest's terminal
summary (and written as JSON to ``$LATENTR3_RELIABILITY_COUNTS`` when that is set), so the
README's figures come from a real run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:  # prepend import mode adds it too
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import COUNTS  # noqa: E402  (the test modules count into it)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if not COUNTS:
        return
    fuzzed = sum(v for k, v in COUNTS.items() if not k.startswith("faults:"))
    faults = sum(v for k, v in COUNTS.items() if k.startswith("faults:"))
    terminalreporter.write_sep("-", "reliability counts")
    for k in sorted(COUNTS):
        terminalreporter.write_line(f"{k:45s} {COUNTS[k]:8d}")
    terminalreporter.write_line(f"{'TOTAL inputs fuzzed':45s} {fuzzed:8d}")
    terminalreporter.write_line(f"{'TOTAL faults injected':45s} {faults:8d}")
    out = os.environ.get("LATENTR3_RELIABILITY_COUNTS")
    if out:
        Path(out).write_text(json.dumps(dict(COUNTS), indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained on a few strings (vocab 300): every string encodes."""
    from latentr3_fast.data import train_tokenizer

    texts = ['"Greatest Hits"\n', "The user has played the following musics before:"] * 4
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a loaded 2-core machine: one intra-op thread is much faster (no spinning
    workers competing with other processes); restored afterwards for other test dirs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

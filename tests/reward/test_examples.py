"""The runnable examples in examples/ stay runnable (short settings)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_custom_loop_example_improves_reward():
    history = _load("custom_loop_reward").main(["--steps", "12"])["history"]
    assert all(math.isfinite(x) for x in history)
    assert history[-1] > history[0]  # the answer's perplexity went down


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--conversational"]])
def test_trl_example_runs(flags, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = _load("trl_grpo_reward").main(["--steps", "1", "--output-dir", str(tmp_path), *flags])
    assert len(out["logs"]) == 1
    assert math.isfinite(out["logs"][0][f"rewards/{out['reward_name']}/mean"])

"""``bench/gpu_check.sh --dry-run``: the prepared GPU run's steps, tiny shapes, on CPU.

Runs the same step sequence and bench scripts as the GPU run (interpreter instead of CUDA), so a
typo or a broken script is found here, not in the first minute of a GPU lease.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # ~2-4 minutes on 2 cores: it trains and decodes tiny models

STEPS = ["install", "tests", "logprob", "logprob_autotune", "grpo", "sft", "reward", "decode"]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)  # fmt: skip
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {s["name"]: s["log_tail"] for s in summary["steps"] if s["exit"] != 0}
    assert proc.returncode == 0 and summary["passed"], (failed, proc.stdout[-3000:])
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["machine"]["dry_run"] is True
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu_check (dry run")
    lp = json.loads((tmp_path / "bench_logprob.json").read_text())
    timed = {(r["mode"], r["variant"]) for r in lp["rows"] if "seconds" in r}
    modes, variants = ("fwd", "fwd+bwd", "fwd+bwd+dW"), ("triton", "torch", "liger")
    assert timed == {(m, v) for m in modes for v in variants}
    assert all(r["deterministic"] for r in lp["rows"] if "deterministic" in r)
    # the three implementations agree (bf16 inputs; values and dH)
    assert max(r.get("max_diff_value_vs_torch", 0) for r in lp["rows"]) < 0.05
    grpo = json.loads((tmp_path / "bench_grpo.json").read_text())
    assert {r["variant"] for r in grpo["rows"]} == {"keep_graph", "reference"}
    sft = json.loads((tmp_path / "bench_sft.json").read_text())
    assert sft["config"]["device"] == "cpu" and sft["summary"]["speedup"] > 0

"""``torchrun --nproc_per_node=2`` (two gloo CPU processes) runs the whole pipeline, and its
SFT stage reaches the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
from conftest import cli_env, run_cli
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stage_all(staged_run, tmp_path):
    out = tmp_path / "run"
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    prefix += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    prefix += ["-m", "latentr3_fast.train"]
    res = run_cli(
        ["--stage", "all", "--output-dir", str(out)],
        prefix=prefix,
        env=cli_env(LATENTR3_DIST_TIMEOUT="60"),
        timeout=150,
    )
    assert res.returncode == 0, res.describe()
    assert "Traceback" not in res.stderr, res.describe()
    # rank 0 alone printed the table and wrote the results
    assert res.stdout.count("results, predictions and report.md") == 1, res.describe()
    models = {r["model"] for r in json.loads((out / "metrics.json").read_text())}
    assert {"w/o reasoning", "SFT only", "LatentR3"} <= models
    for stage in ("sft", "sft_baseline", "grpo"):
        assert (out / stage / "model").is_dir(), stage
    log = [json.loads(x) for x in (out / "sft" / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1]  # logged once (rank 0), not twice
    one_log = [
        json.loads(x) for x in (staged_run[0] / "sft" / "sft_log.jsonl").read_text().splitlines()
    ]
    # same global batch: same step-1 loss / pre-clip grad norm / token counts and val losses
    # (the loss and the norm are scale-sensitive, which Adam's update is not)
    for key in ("loss", "grad_norm", "target_tokens", "tokens"):
        assert log[0][key] == pytest.approx(one_log[0][key], rel=1e-5), key
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals and vals == pytest.approx([r["val_loss"] for r in one_log if "val_loss" in r])

    # the SFT stage equals the one-process --stage sft run with the same options
    one = load_file(str(staged_run[0] / "sft" / "model" / "model.safetensors"))
    two = load_file(str(out / "sft" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    ratt1 = load_file(str(staged_run[0] / "sft" / "model" / "latent_ratt.safetensors"))
    ratt2 = load_file(str(out / "sft" / "model" / "latent_ratt.safetensors"))
    for k in ratt1:
        torch.testing.assert_close(ratt2[k], ratt1[k], atol=1e-5, rtol=1e-5, msg=k)

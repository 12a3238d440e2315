"""Bad input to ``python -m latentr3_fast.train``: each case gives ONE clear message on stderr
(no traceback) and a non-zero exit code; a NaN loss stops SFT with the step number and keeps
the last good checkpoint, from which --resume continues."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from conftest import HERE, cli_env, run_cli
from safetensors.torch import load_file


def _one_clear_error(res, *needles: str, code: int | None = None) -> str:
    assert res.returncode != 0, res.describe()
    if code is not None:
        assert res.returncode == code, res.describe()
    assert "Traceback" not in res.stderr, res.describe()
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, res.describe()
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def test_unknown_flag(tmp_path):
    res = run_cli(["--output-dir", str(tmp_path / "o"), "--num-latents", "2"], timeout=60)
    _one_clear_error(res, "unrecognized arguments: --num-latents", code=2)
    assert not (tmp_path / "o").exists()


def test_bad_option_value(tmp_path):
    res = run_cli(["--output-dir", str(tmp_path / "o"), "--advantage", "median"], timeout=60)
    _one_clear_error(res, "--advantage", "median", code=2)
    assert not (tmp_path / "o").exists()


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_data"
    res = run_cli(["--data", str(missing), "--output-dir", str(tmp_path / "o")], timeout=60)
    _one_clear_error(res, "--data", str(missing), code=2)
    # nothing written: the corrected command must not be refused as "another run"
    assert not (tmp_path / "o").exists()


def test_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_model"
    res = run_cli(["--model", str(missing), "--output-dir", str(tmp_path / "o")], timeout=60)
    _one_clear_error(res, "--model", str(missing), "no such directory", code=2)
    assert not (tmp_path / "o").exists()


def test_model_hub_name_that_cannot_be_loaded(tmp_path):
    res = run_cli(  # HF_HUB_OFFLINE=1 in cli_env: fails fast instead of trying the network
        ["--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "o")], timeout=90
    )
    _one_clear_error(res, "--model no-such-org/no-such-model", "cannot be loaded", code=2)


def test_output_dir_holding_another_run(staged_run):
    out = staged_run[0]
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    res = run_cli(["--stage", "sft", "--output-dir", str(out)], timeout=60)
    _one_clear_error(res, str(out), "--resume", "--overwrite", code=2)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # untouched


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # 64 rows / 32 per step = 2 steps per epoch: steps 1-2 are fine (epoch-end checkpoint at
    # step 2), from step 3 every loss is NaN; the guard skips 5 steps, then stops at step 7
    # (patience 10: skipped steps leave the validation loss flat, early stopping must wait);
    # the SFT budget is pinned here, not taken from the (tunable) embedded defaults
    args = ["--stage", "sft", "--output-dir", str(out), "--max-steps", "9", "--sft-patience", "10"]
    args += ["--sft-batch-size", "32", "--sft-micro-batch-size", "32", "--sft-epochs", "6"]
    res = run_cli(
        args,
        prefix=[sys.executable, str(HERE / "nan_main.py")],
        env=cli_env(LATENTR3_TEST_NAN_AFTER="2"),
    )
    line = _one_clear_error(res, "step 7", "non-finite", code=3)
    ckpts = sorted((out / "sft" / "checkpoints").iterdir())
    assert ckpts and all(c.name.startswith("step-") for c in ckpts)
    assert ckpts[-1].name in line  # the message names the checkpoint to resume from
    assert int(ckpts[-1].name.split("-")[1]) < 7
    weights = load_file(str(ckpts[-1] / "model" / "model.safetensors"))
    assert all(bool(v.isfinite().all()) for v in weights.values())  # nothing NaN was saved
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    vals = [h["val_loss"] for h in state["history"] if "val_loss" in h]
    assert vals and all(math.isfinite(v) for v in vals)
    assert not (out / "sft" / "model").exists()  # the stage did not finish

    # the same command, with --resume and without the NaN, continues and finishes
    res = run_cli([*args, "--resume"])
    assert res.returncode == 0, res.describe()
    assert (out / "sft" / "model").is_dir()
    log = [json.loads(x) for x in (out / "sft" / "sft_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 9 and math.isfinite(log[-1]["val_loss"])
    assert os.path.exists(out / "config.yaml")


# Machine and --config problems: one line each, BEFORE any data loads (--data points nowhere,
# so a check that ran after loading would report the data instead).
NO_CUDA = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU seen"
RUNTIME_CASES = {
    "cuda": (
        ["--device", "cuda"],
        f"--device cuda: CUDA is not available on this machine ({NO_CUDA}); use --device cpu "
        "or auto",
    ),
    "cuda1": (
        ["--device", "cuda:1"],
        f"--device cuda:1: CUDA is not available on this machine ({NO_CUDA}); use --device "
        "cpu or auto",
    ),
    "mps": (
        ["--device", "mps"],
        "--device mps: Apple MPS is not available on this machine; use --device cpu or auto",
    ),
    "bad-device": (
        ["--device", "gpu0"],
        "--device gpu0: not a device name (auto, cpu, cuda, cuda:N or mps)",
    ),
    "fp16-cpu": (
        ["--dtype", "fp16", "--device", "cpu"],
        "--dtype fp16: half-precision training is not supported on CPU; use --dtype fp32 (the "
        "CPU default) or bf16",
    ),
    "flash": (
        ["--attn-implementation", "flash_attention_2"],
        "--attn-implementation flash_attention_2: the flash_attn package is not installed (pip "
        'install ".[flash]" on a CUDA machine); use sdpa or eager',
    ),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_machine_errors_are_one_line_before_data_loads(tmp_path, case):
    args, message = RUNTIME_CASES[case]
    if case.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if case == "flash" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    data = tmp_path / "no_such_data"
    res = run_cli(["--data", str(data), "--output-dir", str(tmp_path / "o"), *args], timeout=60)
    line = _one_clear_error(res, code=2)
    assert line == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_config_file_errors_are_one_line(tmp_path):
    missing = tmp_path / "none.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft-lr: 3e-4\nnum-beams: [1, 2\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("sft-lr: 3e-4\nnum-beam: 4\n")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("num-beams: many\n")
    cases = {
        missing: f"error: --config: file not found: {missing}",
        bad: f"error: --config {bad}: not valid YAML: line 3, column 1: expected ',' or ']', "
        "but got '<stream end>'",
        unknown: f"error: --config {unknown}: unknown option 'num-beam'",
        wrong: f"error: --config {wrong}: option 'num_beams': cannot read 'many' as int",
    }
    for path, message in cases.items():
        data = tmp_path / "no_such_data"
        res = run_cli(["--config", str(path), "--data", str(data)], tiny=False, timeout=60)
        assert _one_clear_error(res, code=2) == message

"""Bad input to ``python -m latentr3_fast.train``: each case gives ONE clear message on stderr
(no traceback) and a non-zero exit code; a NaN loss stops SFT with the step number and keeps
the last good checkpoint, from which --resume continues."""

from __future__ import annotations

import json
import math
import os
import sys

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

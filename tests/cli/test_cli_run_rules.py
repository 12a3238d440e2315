"""What the CLI does to an existing output directory (issue 16): a stage never deletes another
stage's outputs, ``--stage eval`` re-evaluates a finished run, reuse with other data or model
options is refused in one line, and Ctrl-C / SIGTERM checkpoints SFT before stopping."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from conftest import TINY, cli_env, run_cli

from latentr3_fast.data import make_synthetic


def _digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _only_error_line(res) -> str:
    assert "Traceback" not in res.stderr, res.describe()
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.describe()
    return lines[0]


def test_stage_eval_reevaluates_and_overwrite_replaces_only_its_stage(staged_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(staged_run[0], out)
    sft_w = _digest(out / "sft" / "model" / "model.safetensors")
    grpo_w = _digest(out / "grpo" / "model" / "latent_ratt.safetensors")
    (out / "metrics.json").write_text("[]")  # marks the old evaluation

    # a finished run: --stage eval just re-evaluates (no flag needed), the models stay;
    # --exclude-seen (not model-shaping) drops each row's history titles from its predictions
    res = run_cli(["--stage", "eval", "--output-dir", str(out), "--exclude-seen"])
    assert res.returncode == 0, res.describe()
    assert json.loads((out / "metrics.json").read_text())  # rewritten
    assert _digest(out / "sft" / "model" / "model.safetensors") == sft_w
    ds = make_synthetic(num_items=60, num_users=80, seed=42)  # TINY's data
    preds = [json.loads(x) for x in (out / "predictions-sft-D3.jsonl").read_text().splitlines()]
    assert len(preds) == 8
    for p in preds:
        assert not set(p["pred_titles"]) & set(ds.test[p["row"]].history_titles), p

    # --stage eval --overwrite (the hint users followed) deletes no other stage's outputs
    (out / "metrics.json").write_text("[]")
    res = run_cli(["--stage", "eval", "--overwrite", "--output-dir", str(out)])
    assert res.returncode == 0, res.describe()
    assert json.loads((out / "metrics.json").read_text())
    assert _digest(out / "sft" / "model" / "model.safetensors") == sft_w
    assert _digest(out / "grpo" / "model" / "latent_ratt.safetensors") == grpo_w

    # the timing table covers the whole run: every stage of the earlier invocations
    report = (out / "report.md").read_text()
    for stage in ("data", "sft", "grpo", "eval", "total"):
        assert f"| {stage} | " in report, stage
    # the help says which split RecBole data get
    res = run_cli(["--help"], tiny=False, timeout=60)
    assert "global temporal 80/10/10" in res.stdout and "not leave-one-out" in res.stdout

    # --stage grpo --overwrite replaces grpo/ only: sft/ and the evaluation stay
    marker = out / "grpo" / "old-file"
    marker.write_text("x")
    metrics = _digest(out / "metrics.json")
    res = run_cli(["--stage", "grpo", "--overwrite", "--output-dir", str(out)])
    assert res.returncode == 0, res.describe()
    assert not marker.exists() and (out / "grpo" / "model").is_dir()
    assert _digest(out / "sft" / "model" / "model.safetensors") == sft_w
    assert _digest(out / "metrics.json") == metrics


def test_stage_over_its_own_outputs_needs_resume_or_overwrite(staged_run):
    out = staged_run[0]
    res = run_cli(["--stage", "grpo", "--output-dir", str(out)], timeout=60)
    assert res.returncode == 2, res.describe()
    assert _only_error_line(res) == (
        f"error: --output-dir {out} already holds grpo (written by --stage grpo); pass "
        "--resume to continue, or --overwrite to replace only what --stage grpo writes"
    )


def test_resume_with_other_data_or_model_options_is_refused(staged_run):
    out = staged_run[0]
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    # other data: 50 synthetic items instead of TINY's 60
    args = ["--stage", "eval", "--resume", "--output-dir", str(out), "--synthetic-items", "50"]
    res = run_cli(args)
    assert res.returncode == 2, res.describe()
    line = _only_error_line(res)
    assert line.startswith(
        f"error: --resume: the run in {out} was made with other settings: the data differ "
        "(run: synthetic, "
    ), line
    assert line.endswith(
        "use another --output-dir, or --stage all --overwrite to replace the whole run"
    )
    # an option that shapes the model
    res = run_cli(["--stage", "grpo", "--resume", "--output-dir", str(out), "--num-latent", "2"])
    assert res.returncode == 2, res.describe()
    assert _only_error_line(res) == (
        f"error: --resume: the run in {out} was made with other settings: --num-latent 2 "
        "(run: 1); use another --output-dir, or --stage all --overwrite to replace the whole run"
    )
    # --stage eval without --resume checks the same
    res = run_cli(["--stage", "eval", "--output-dir", str(out), "--category", "films"])
    assert res.returncode == 2, res.describe()
    assert "--stage eval: the run in" in _only_error_line(res)
    assert "--category 'films' (run: None)" in _only_error_line(res)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing written


def _wait_for_step(log, proc, at_least: int, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if log.is_file():
            steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines() if x]
            if steps and max(steps) >= at_least:
                return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no SFT step was logged in time")


def test_sigint_and_sigterm_during_sft_checkpoint_then_resume_finishes(tmp_path):
    """Ctrl-C in SFT's first epoch (no epoch-end checkpoint yet) keeps the steps done, as the
    message says; SIGTERM too; --resume then finishes the stage."""
    out = tmp_path / "run"
    # 64 rows / 8 per step: 8 steps per epoch, 40 steps in all; log every step
    args = ["--stage", "sft", "--output-dir", str(out), "--max-steps", "40", "--sft-epochs", "5"]
    args += ["--sft-batch-size", "8", "--sft-micro-batch-size", "8", "--category", "old books"]
    cmd = [sys.executable, "-m", "latentr3_fast.train", *TINY, *args]
    for sig, resume in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume"])):
        proc = subprocess.Popen(
            cmd + resume, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        log = out / "sft" / "sft_log.jsonl"
        done_before = 0
        if resume:
            done_before = max(json.loads(x)["step"] for x in log.read_text().splitlines() if x)
        _wait_for_step(log, proc, done_before + 1)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, (stdout, stderr)
        assert "Traceback" not in stderr, stderr
        (line,) = [x for x in stderr.splitlines() if x.startswith("interrupted:")]
        prefix = "interrupted: SFT interrupted after step "
        assert line.startswith(prefix), line
        step = int(line[len(prefix) :].split(":")[0])
        assert line == (
            f"{prefix}{step}: checkpoint saved in {out / 'sft'} (--resume continues from it)"
        )
        assert done_before < step < 40
        ckpts = sorted(p.name for p in (out / "sft" / "checkpoints").iterdir())
        assert ckpts[-1] == f"step-{step:08d}", ckpts
        assert "threads: 1 (OMP_NUM_THREADS=1" in stdout  # the thread count is printed
        assert "category 'old books'" in stdout
    res = run_cli([*args, "--resume"])
    assert res.returncode == 0, res.describe()
    assert (out / "sft" / "model").is_dir()
    log_text = (out / "sft" / "sft_log.jsonl").read_text()
    steps = [json.loads(x)["step"] for x in log_text.splitlines()]
    assert steps[-1] == 40
    assert "validation loss" in res.stdout + res.stderr  # printed on the console, not only logged

"""``python -m latentr3_fast.train`` in subprocesses: each stage alone on one output dir, the
outputs, resuming a finished stage, ``--config`` + flag override, and ``--help``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from latentr3_fast.train.config import RunConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_each_stage_alone_then_eval_writes_every_output(staged_run):
    out, results = staged_run
    # each stage left its own artefacts
    for stage in ("sft", "grpo"):
        assert (out / stage / "model").is_dir(), stage
        assert any((out / stage / "checkpoints").iterdir()), stage
    assert not (out / "sft_baseline").exists()  # only --stage all trains the baseline

    records = json.loads((out / "metrics.json").read_text())
    evaluated = {(r["model"], r["scoring"]) for r in records}
    assert evaluated >= {(m, s) for m in ("SFT only", "LatentR3") for s in ("BIGRec", "D3")}
    assert ("popularity", "-") in evaluated

    # the metrics are those of the written predictions (0-based rank, None = not retrieved)
    for rec in records:
        if rec["stage"] == "popularity":
            continue
        preds = _jsonl(out / f"predictions-{rec['stage']}-{rec['scoring']}.jsonl")
        assert len(preds) == 8 == rec["n"]
        assert all(len(p["pred_titles"]) <= 2 for p in preds)  # --num-beams 2
        ranks = [p["rank"] for p in preds]
        hr = sum(r is not None and r < 1 for r in ranks) / len(ranks)
        ndcg = sum(1 / math.log2(r + 2) for r in ranks if r is not None and r < 1) / len(ranks)
        assert math.isclose(rec["HR@1"], hr, abs_tol=1e-9), rec
        assert math.isclose(rec["NDCG@1"], ndcg, abs_tol=1e-9), rec
        # 2 beams rank 2 items: K = 3..20 cannot be reached and are not reported
        assert rec["ks_beyond_returned"] == [3, 5, 10, 20] and "HR@10" not in rec, rec
        for p in preds:  # a hit's rank points at the target's title
            if p["rank"] is not None:
                assert p["pred_titles"][p["rank"]] == p["target_title"]

    log = _jsonl(out / "train_log.jsonl")
    assert {r["stage"] for r in log} == {"sft", "grpo"}
    assert any(r["stage"] == "sft" and "loss" in r for r in log)
    assert any(r["stage"] == "sft" and "val_loss" in r for r in log)
    assert any(r["stage"] == "grpo" and "reward_clean_mean" in r for r in log)

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stage"] == "eval" and cfg["resume"] is True  # the last command's config
    report = (out / "report.md").read_text()
    assert "HR@10" in report and "NDCG@10" in report and "LatentR3" in report
    # the latent swap test ran for both latent models, on the evaluated validation rows
    usage = json.loads((out / "latent_usage.json").read_text())
    assert set(usage) == {"SFT only", "LatentR3"}
    for u in usage.values():
        assert u["rows"] == 8 and u["nll"] > 0 and u["nll_swapped"] > 0
        assert math.isclose(u["gap"], u["nll_swapped"] - u["nll"], abs_tol=1e-12)
    assert "swap test" in report and "latent swap test, SFT only" in results["eval"].stdout
    pngs = sorted(out.glob("*.png"))
    assert {"sft_loss.png", "grpo_reward.png", "metrics.png"} <= {p.name for p in pngs}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    # GRPO validation (--max-steps 2: steps 0, 1, 2): the kept step is the curve's best and
    # the report and the printout name it
    _check_grpo_selection(out, "best")
    sel = json.loads((out / "grpo" / "validation.json").read_text())["selected_step"]
    assert f"LatentR3 = GRPO step {sel} of 2" in report
    assert "| step | reward | NLL |" in report
    assert f"LatentR3 = GRPO step {sel} of 2" in results["eval"].stdout
    # the results table is printed, no traceback anywhere
    assert "LatentR3" in results["eval"].stdout and "HR@10" in results["eval"].stdout
    assert all("Traceback" not in r.stderr for r in results.values())


def _ratt_weights(path):
    return load_file(str(path))


def _check_grpo_selection(out, selection: str) -> None:
    """grpo/model's LatentRATT holds the weights of the step validation.json names: step 0 =
    the SFT model's, the last step = the final checkpoint's, another = the checkpoint's
    stored best weights."""
    val = json.loads((out / "grpo" / "validation.json").read_text())
    assert val["selection"] == selection and val["metric"] == "reward"
    curve = val["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and val["last_step"] == 2
    best = max(curve, key=lambda c: c["val_reward"])["step"]  # the first of equal values
    assert val["best_step"] == best
    assert val["selected_step"] == (best if selection == "best" else 2)
    got = _ratt_weights(out / "grpo" / "model" / "latent_ratt.safetensors")
    ckpt = out / "grpo" / "checkpoints" / "step-00000002"
    if val["selected_step"] == 0:
        want = _ratt_weights(out / "sft" / "model" / "latent_ratt.safetensors")
    elif val["selected_step"] == 2:
        want = _ratt_weights(ckpt / "model" / "model.safetensors")
    else:
        want = _ratt_weights(ckpt / "best_weights.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_grpo_select_last_is_the_reference(staged_run, tmp_path):
    """``--grpo-select last``: the same curve, but grpo/model is the last step's."""
    out = tmp_path / "run"
    shutil.copytree(staged_run[0], out)
    shutil.rmtree(out / "grpo")
    res = run_cli(
        ["--stage", "grpo", "--resume", "--output-dir", str(out), "--grpo-select", "last"]
    )
    assert res.returncode == 0, res.describe()
    _check_grpo_selection(out, "last")
    ref = json.loads((staged_run[0] / "grpo" / "validation.json").read_text())["curve"]
    got = json.loads((out / "grpo" / "validation.json").read_text())["curve"]
    assert [c["val_reward"] for c in got] == [c["val_reward"] for c in ref]


def test_resume_of_a_finished_stage_does_not_retrain(staged_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(staged_run[0], out)
    before_log = (out / "sft" / "sft_log.jsonl").read_text()
    before = load_file(str(out / "sft" / "model" / "model.safetensors"))
    res = run_cli(["--stage", "sft", "--output-dir", str(out), "--resume"])
    assert res.returncode == 0, res.describe()
    assert (out / "sft" / "sft_log.jsonl").read_text() == before_log  # no new step
    after = load_file(str(out / "sft" / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(bool((before[k] == after[k]).all()) for k in before)


def test_config_file_with_flag_override(tmp_path):
    cfg_file = tmp_path / "opts.yaml"
    cfg_file.write_text(
        "sft-lr: 5e-3\n"  # YAML reads this as a string: must still become a float
        "num_beams: 3\n"
        "seed: 7\n"
        "latent-mode: hidden\n"
        "sft_batch_size: 16\n"
    )
    out = tmp_path / "run"
    res = run_cli(
        ["--stage", "sft", "--output-dir", str(out), "--config", str(cfg_file)]
        + ["--seed", "11", "--max-steps", "1", "--sft-micro-batch-size", "8"]
    )
    assert res.returncode == 0, res.describe()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["sft-lr"] == 5e-3  # from the file (not the embedded default 3e-3)
    assert saved["latent-mode"] == "hidden"  # from the file
    assert saved["seed"] == 11  # flag beats file
    assert saved["num-beams"] == 2  # flag (TINY) beats file
    assert saved["sft-batch-size"] == 16 and saved["sft-micro-batch-size"] == 8
    assert saved["synthetic-items"] == 60 and saved["stage"] == "sft"
    # every option is in the saved file, so it can be fed back with --config
    assert set(saved) == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    # ... and the values reached the trainer
    (ckpt,) = sorted((out / "sft" / "checkpoints").iterdir())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 5e-3 and state["config"]["seed"] == 11
    assert state["config"]["batch_size"] == 8 and state["config"]["grad_accum"] == 2
    reasoner = json.loads((out / "sft" / "model" / "latentr3_config.json").read_text())
    assert reasoner["latent_mode"] == "hidden"


def test_help_documents_every_option_with_its_default():
    res = run_cli(["--help"], tiny=False, timeout=60)
    assert res.returncode == 0, res.describe()
    text = res.stdout
    # one block per option: from its "  --flag" line to the next option line
    blocks = {}
    for block in re.split(r"\n(?=  -)", text):
        m = re.match(r"\s*(--[a-z0-9-]+)", block)
        if m:
            blocks[m.group(1)] = " ".join(block.split())
    assert "--config" in blocks
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in blocks, f"{flag} missing from --help"
        want = f"(default: {getattr(defaults, f.name)})"
        assert want in blocks[flag], f"{flag}: {want!r} not in {blocks[flag]!r}"
        assert len(blocks[flag]) > len(flag) + len(want) + 5, f"{flag} has no description"


def test_save_steps_checkpoints_inside_a_stage(tmp_path):
    """``--save-steps 1`` writes a checkpoint after every optimizer step of SFT and GRPO."""
    out = tmp_path / "run"
    res = run_cli(["--stage", "sft", "--output-dir", str(out), "--save-steps", "1"])
    assert res.returncode == 0, res.describe()
    res = run_cli(["--stage", "grpo", "--resume", "--output-dir", str(out), "--save-steps", "1"])
    assert res.returncode == 0, res.describe()
    for stage in ("sft", "grpo"):
        steps = sorted(p.name for p in (out / stage / "checkpoints").iterdir())
        assert "step-00000001" in steps and "step-00000002" in steps, (stage, steps)

"""In-process pieces of the CLI (issue 16): the tiny-backbone profile on any data, thread
defaults, run fingerprints, timings over resumed invocations, and the report's wording."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from latentr3_fast.data import make_synthetic
from latentr3_fast.train import runtime
from latentr3_fast.train.config import EMBEDDED_DEFAULTS, RunConfig
from latentr3_fast.train.pipeline import (
    apply_embedded_defaults,
    below_popularity,
    load_data,
    popularity_baseline,
)
from latentr3_fast.train.rundir import (
    fingerprint_difference,
    load_timings,
    record_timing,
    run_fingerprint,
)


@pytest.mark.parametrize("data", ["synthetic", "/some/real/data", "recbole:/d/ml-100k"])
def test_tiny_profile_applies_to_any_data_without_model(data):
    cfg = apply_embedded_defaults(RunConfig(data=data), given={"data"})
    for k, v in EMBEDDED_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    # options the user set are kept; a pretrained --model keeps the reference defaults
    cfg = apply_embedded_defaults(RunConfig(data=data, sft_lr=1e-5), given={"data", "sft_lr"})
    assert cfg.sft_lr == 1e-5 and cfg.sft_batch_size == EMBEDDED_DEFAULTS["sft_batch_size"]
    ref = RunConfig(data=data, model="/m")
    assert apply_embedded_defaults(ref, given={"data", "model"}) == ref


def test_default_threads_respects_affinity_load_and_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime, "_physical_cores", lambda: 8)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert runtime.default_threads()[0] == 4  # never more than the usable cores
    monkeypatch.setattr(runtime, "_physical_cores", lambda: 2)
    assert runtime.default_threads()[0] == 2  # physical cores (no hyper-threads)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.4, 0.0, 0.0))
    n, why = runtime.default_threads()
    assert n == 1 and "load 3.4" in why  # 4 usable - 3 busy
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert runtime.default_threads()[0] == 1  # at least one
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads()[0] == 1  # 2 physical cores shared by 2 processes
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert runtime.default_threads()[0] == 4  # the user's setting, within the usable cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == (3, "OMP_NUM_THREADS=3, 4 usable cores")
    before = torch.get_num_threads()
    try:
        assert runtime.apply_threads(2) == (2, "--threads")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_physical_cores_reads_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    # 2 sockets x 2 cores x 2 hyper-threads = 8 logical CPUs, 4 physical cores
    blocks = [
        f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {(i // 2) % 2}\n"
        for i in range(8)
    ]
    info.write_text("\n".join(blocks))
    real = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert runtime._physical_cores() == 4


def test_fingerprint_names_what_changed():
    ds = make_synthetic(num_items=40, num_users=30, seed=3)
    cfg = RunConfig(synthetic_items=40, synthetic_users=30, seed=3)
    fp = run_fingerprint(cfg, ds)
    assert fingerprint_difference(fp, run_fingerprint(cfg, ds)) is None
    other = make_synthetic(num_items=40, num_users=30, seed=4)
    diff = fingerprint_difference(fp, run_fingerprint(dataclasses.replace(cfg, seed=4), other))
    assert diff.startswith("the data differ (run: synthetic, ")
    two = run_fingerprint(dataclasses.replace(cfg, num_latent=2, template="clean"), ds)
    assert fingerprint_difference(fp, two) == (
        "--num-latent 2 (run: 1), --template 'clean' (run: 'reference')"
    )
    # options that do not shape the model (learning rate, beams) are not part of it
    same = run_fingerprint(dataclasses.replace(cfg, sft_lr=1.0, num_beams=3), ds)
    assert fingerprint_difference(fp, same) is None


def test_timings_add_up_over_resumed_invocations(tmp_path):
    record_timing(tmp_path, "sft", 10.0, resumed=False)
    record_timing(tmp_path, "sft", 5.0, resumed=True)  # the resumed rest of the stage
    record_timing(tmp_path, "eval", 3.0, resumed=False)
    record_timing(tmp_path, "eval", 4.0, resumed=False)  # re-evaluation replaces
    assert load_timings(tmp_path) == {"sft": 15.0, "eval": 4.0}


def test_category_flag_reaches_the_dataset():
    cfg = RunConfig(synthetic_items=40, synthetic_users=30, category="old books")
    assert load_data(cfg).category == "old books"


def test_below_popularity_and_exclude_seen_popularity():
    ds = make_synthetic(num_items=40, num_users=30, seed=3)
    pop = popularity_baseline(ds, None)
    records = [
        {"model": "SFT only", "stage": "sft", "scoring": "D3", "NDCG@10": pop["NDCG@10"] / 2},
        {"model": "LatentR3", "stage": "grpo", "scoring": "D3", "NDCG@10": pop["NDCG@10"] * 2},
        pop,
    ]
    (line,) = below_popularity(records)
    assert line.startswith(
        f"SFT only (D3) is below the popularity baseline: NDCG@10 {pop['NDCG@10'] / 2:.4f} vs "
        f"{pop['NDCG@10']:.4f}."
    )
    # excluding seen items: each row's ranking skips its history titles (hand-computed)
    from latentr3_fast.data import ItemCatalog, RecDataset, Sample

    titles = ["A", "B", "C"]
    train = [Sample((2,), ("C",), t, titles[t]) for t in (0, 0, 0, 1, 1, 2)]  # A > B > C
    test = [Sample((0,), ("A",), 1, "B"), Sample((2,), ("C",), 0, "A")]
    tiny = RecDataset(train, [], test, ItemCatalog(titles), "x", "x")
    keep, drop = popularity_baseline(tiny, None), popularity_baseline(tiny, None, True)
    assert keep["HR@1"] == 0.5 and drop["HR@1"] == 1.0  # row 1: B is 2nd, 1st without A
    assert keep["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert drop["NDCG@10"] == pytest.approx(1.0)


def test_report_words_zero_base_gain_and_below_popularity(tmp_path):
    from latentr3_fast.eval.report import group_gain_table, swap_gap_words, write_report

    group = {"popular": {"NDCG@10": 0.2}, "unpopular": {"NDCG@10": 0.0}}
    records = [
        {"model": "w/o reasoning", "scoring": "D3", "NDCG@10": 0.1, "groups": group},
        {
            "model": "LatentR3",
            "scoring": "D3",
            "NDCG@10": 0.12,
            "groups": {"popular": {"NDCG@10": 0.3}, "unpopular": {"NDCG@10": 0.05}},
        },
    ]
    gains = group_gain_table(records, "w/o reasoning", "LatentR3")
    assert [g["relative_gain"] for g in gains] == [pytest.approx(0.5), None]
    usage = {"SFT only": {"nll": 0.5, "nll_swapped": 0.5, "relative_gap": 0.0}}
    below = ["SFT only (D3) is below the popularity baseline: NDCG@10 0.0010 vs 0.0100."]
    write_report(
        tmp_path / "r.md", records, {"sft": 2.0, "total": 2.0}, {}, gains=gains,
        latent_usage=usage, below_popularity=below,
    )  # fmt: skip
    text = (tmp_path / "r.md").read_text()
    assert "inf%" not in text and "inf %" not in text
    assert "| D3 | unpopular | 0.0000 | 0.0500 | n/a (base is 0) |" in text
    assert "| D3 | popular | 0.2000 | 0.3000 | +50.0% |" in text
    assert "**Below the popularity baseline.** " + below[0] in text
    assert "- SFT only: " + swap_gap_words(0.0) in text
    assert "carries no information about this user" in swap_gap_words(0.0)
    assert "carries information about this user" in swap_gap_words(0.02)
    assert "MORE likely" in swap_gap_words(-0.02)
    assert "Summed over every invocation of this run" in text


def test_every_trainer_field_is_a_flag_or_mapped_from_a_run_argument():
    """The CLI is generated from SFTConfig/GRPOConfig: a trainer field has a flag of its own
    unless a run argument of the same name or TRAINER_FIELDS_FROM_RUN fills it."""
    from latentr3_fast.train.config import (
        RUN_ARG_NAMES,
        TRAINER_FIELDS_FROM_RUN,
        build_parser,
        trainer_option_names,
    )
    from latentr3_fast.train.configs import GRPOConfig, SFTConfig

    flags = {a.dest for a in build_parser()._actions}
    for cls in (SFTConfig, GRPOConfig):
        own = trainer_option_names(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
            by_rule = f.name in RUN_ARG_NAMES or f.name in TRAINER_FIELDS_FROM_RUN[cls]
            assert by_rule or own[f.name] in flags, (cls.__name__, f.name)
    assert trainer_option_names(SFTConfig)["lr"] == "sft_lr"
    assert trainer_option_names(GRPOConfig)["lr"] == "grpo_lr"
    assert trainer_option_names(GRPOConfig)["sigma"] == "sigma"  # its existing spelling


def test_flags_reach_the_trainer_configs():
    from latentr3_fast.train.config import load_config

    argv = ["--sft-batch-size", "64", "--sft-micro-batch-size", "16", "--sft-epochs", "1.5"]
    argv += ["--eval-batch-size", "8", "--sft-schedule", "cosine", "--optim", "adamw"]
    argv += ["--grpo-select", "last", "--prompts-per-step", "12", "--grpo-adam-betas", "0.8"]
    argv += ["0.9", "--grpo-loss-pass", "recompute", "--save-steps", "3", "--seed", "7"]
    cfg, given = load_config(argv)
    assert {"sft_schedule", "grpo_adam_betas"} <= given
    sft = cfg.sft_config("out/sft")
    assert (sft.batch_size, sft.grad_accum, sft.epochs, sft.eval_batch_size) == (16, 4, 2, 16)
    assert (sft.schedule, sft.save_steps, sft.seed, sft.output_dir) == ("cosine", 3, 7, "out/sft")
    grpo = cfg.grpo_config("out/grpo", num_train=10)
    assert (grpo.prompts_per_step, grpo.load_best_at_end, grpo.loss_pass) == (
        10,
        False,
        "recompute",
    )
    assert (grpo.adam_betas, grpo.save_steps, grpo.eval_batch_size) == ((0.8, 0.9), 3, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sft_lr": 0.0}, "--sft-lr must be > 0, got 0.0"),
        ({"grpo_eval_steps": 0}, "--grpo-eval-steps must be >= 1, got 0"),
        ({"advantage": "mean"}, "--advantage: 'mean' is not one of batch, group, none"),
    ],
)
def test_trainer_checks_name_the_flag(kwargs, message):
    """Values are checked by SFTConfig/GRPOConfig; on the command line the message names the
    flag (in Python, the field)."""
    from latentr3_fast.errors import ConfigError
    from latentr3_fast.train.configs import GRPOConfig

    with pytest.raises(ConfigError) as err:
        RunConfig(**kwargs).validate()
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^GRPOConfig: sigma must be >= 0, got -1.0$"):
        GRPOConfig(sigma=-1.0)


def test_popularity_baseline_matches_titles_as_the_evaluation_does():
    """Titles differing only by the quotes/spaces ``normalize_title`` strips are one item."""
    from latentr3_fast.data import ItemCatalog, RecDataset, Sample

    titles = ['"A"\n', "A", "B"]
    train = [Sample((2,), ("B",), t, titles[t]) for t in (0, 0, 1, 2)]  # A (two ids) > B
    test = [Sample((2,), ("B",), 1, "A"), Sample((0,), ('"A"\n',), 2, "B")]
    tiny = RecDataset(train, [], test, ItemCatalog(titles), "x", "x")
    keep, drop = popularity_baseline(tiny, None), popularity_baseline(tiny, None, True)
    assert keep["HR@1"] == 0.5 and keep["HR@5"] == 1.0  # "A" is 1st, "B" 2nd (not 3rd)
    assert drop["HR@1"] == 1.0  # row 2's history '"A"\n' is "A": skipped, "B" comes 1st

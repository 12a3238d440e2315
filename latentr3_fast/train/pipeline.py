"""The whole pipeline behind ``python -m latentr3_fast.train``: data -> SFT -> GRPO -> evaluation.

Output directory layout::

    config.yaml              effective configuration (defaults < --config file < flags)
    sft/ sft_baseline/ grpo/ trainer checkpoints, logs and the final ``model/`` of each stage
    train_log.jsonl          every logged step of every stage (with a "stage" key)
    metrics.json             one record per (evaluated model, scoring)
    predictions-*.jsonl      per-row ranked predictions
    report.md, *.png         tables, timings, environment, plots
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .config import (  # noqa: F401 (apply_embedded_defaults, uses_tiny_backbone: API)
    RunConfig,
    apply_embedded_defaults,
    save_config,
    uses_tiny_backbone,
)
from .rundir import RUN_MARKERS, load_timings, record_timing  # noqa: F401 (RUN_MARKERS: API)
from .rundir import prepare_output_dir as _prepare_output_dir
from .runtime import apply_threads, check_runtime

MODEL_NAMES = {"sft_baseline": "w/o reasoning", "sft": "SFT only", "grpo": "LatentR3"}
LATENT_USAGE_ROWS = 1000  # validation rows of the CLI's latent swap test


# ----------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed under torchrun (gloo on CPU, NCCL on GPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("LATENTR3_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- pieces
def load_data(cfg: RunConfig):
    """The dataset named by --data (synthetic, a standard-layout dir, or recbole:DIR/NAME)."""
    from ..data import load_dataset, load_recbole, make_synthetic

    if cfg.data == "synthetic":
        ds = make_synthetic(
            num_items=cfg.synthetic_items, num_users=cfg.synthetic_users, seed=cfg.seed
        )
        if cfg.category:
            ds.category = cfg.category
        return ds
    if cfg.data.startswith("recbole:"):
        target = Path(cfg.data[len("recbole:") :]).expanduser()
        if not target.parent.is_dir():
            raise DataError(f"--data {cfg.data}: directory {target.parent} does not exist")
        return load_recbole(target.parent, target.name, category=cfg.category)
    path = Path(cfg.data).expanduser()
    if not path.is_dir():
        raise DataError(f"--data {cfg.data}: not a directory (expected DIR/{{train,valid,test}}/)")
    return load_dataset(path, cfg.category)


def prepare_output_dir(cfg: RunConfig, dataset: Any, rank: int) -> Path:
    """Check --output-dir against the run rules of ``rundir`` (every rank), then let rank 0
    delete what --overwrite replaces and write the fingerprint."""
    _prepare_output_dir(cfg, dataset, write=False)
    barrier()
    if rank == 0:
        _prepare_output_dir(cfg, dataset, write=True)
    barrier()
    return Path(cfg.output_dir)


def build_model(cfg: RunConfig, dataset: Any, num_latent: int, tokenizer: Any = None):
    """A fresh LatentReasoner: the tiny default backbone, or --model loaded by name/path."""
    from ..model import LatentReasoner, tiny_qwen2

    dtype = None if cfg.dtype == "auto" else cfg.dtype
    device = None if cfg.device == "auto" else cfg.device
    if cfg.model is None:
        if tokenizer is None:
            from ..data import dataset_corpus, train_tokenizer

            tokenizer = train_tokenizer(dataset_corpus(dataset, cfg.template), cfg.tokenizer_vocab)
        return tiny_qwen2(
            tokenizer,
            hidden_size=cfg.tiny_hidden_size,
            num_layers=cfg.tiny_layers,
            num_heads=4,
            num_kv_heads=2,
            intermediate=cfg.tiny_hidden_size * 2,
            seed=cfg.seed,
            num_latent=num_latent,
            latent_mode=cfg.latent_mode,
            torch_dtype=dtype,
            device=device,
            attn_implementation=cfg.attn_implementation,
        )
    check_model_path(cfg)
    try:
        return LatentReasoner.from_pretrained(
            cfg.model,
            num_latent=num_latent,
            latent_mode=cfg.latent_mode,
            torch_dtype=dtype,
            device=device,
            attn_implementation=cfg.attn_implementation,
        )
    except OSError as exc:  # HF: unknown hub name, no network, missing files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model {cfg.model}: cannot be loaded ({first})") from exc


def check_model_path(cfg: RunConfig) -> None:
    """ConfigError when --model looks like a local path but is not a directory."""
    if cfg.model is None:
        return
    local = Path(cfg.model).expanduser()
    looks_local = cfg.model.startswith((".", "/", "~")) or local.exists()
    if local.suffix in (".gguf", ".whl") and local.is_file():
        return  # converted once into the cache by LatentReasoner.from_pretrained
    if looks_local and not local.is_dir():
        raise ConfigError(f"--model {cfg.model}: no such directory or .gguf/.whl file")


def load_stage_model(cfg: RunConfig, out: Path, stage: str):
    """The final model saved by a finished stage."""
    from ..model import LatentReasoner

    path = out / stage / "model"
    if not path.is_dir():
        raise ConfigError(
            f"stage {stage!r} has no saved model at {path}: run that stage first "
            f"(--stage {stage.split('_')[0]}) or use --stage all"
        )
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    device = None if cfg.device == "auto" else cfg.device
    return LatentReasoner.from_pretrained(path, torch_dtype=dtype, device=device)


def save_stage_model(model: Any, out: Path, stage: str, rank: int) -> None:
    """Save a stage's final model atomically (tmp dir, then rename)."""
    if rank != 0:
        return
    final = out / stage / "model"
    tmp = out / stage / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def prompt_builder(cfg: RunConfig, model: Any, dataset: Any):
    from ..data import PromptBuilder

    return PromptBuilder(
        model.tokenizer,
        dataset.category,
        template=cfg.template,
        num_latent=model.num_latent,
        max_length=cfg.max_length,
    )


def run_sft(cfg: RunConfig, model: Any, dataset: Any, out_dir: Path) -> Any:
    """Stage 1 (paper Sec. 3.2.1) on ``model`` (in place); returns the SFTResult."""
    from .sft import SFTTrainer

    pb = prompt_builder(cfg, model, dataset)
    train = pb.encode_many(dataset.train[: cfg.max_train_samples])
    valid = pb.encode_many(dataset.valid[: cfg.max_eval_samples])
    return SFTTrainer(model, cfg.sft_config(str(out_dir)), train, valid).train()


def run_grpo(cfg: RunConfig, model: Any, dataset: Any, out_dir: Path) -> Any:
    """Stage 2 (paper Sec. 3.2.2) on ``model`` (in place); returns the trainer's result."""
    from .grpo import GRPOTrainer

    pb = prompt_builder(cfg, model, dataset)
    train = pb.encode_many(dataset.train[: cfg.max_train_samples])
    valid = pb.encode_many(dataset.valid[: cfg.max_eval_samples])
    grpo_cfg = cfg.grpo_config(str(out_dir), num_train=len(train))
    reward = None
    if cfg.reward == "hit":
        from ..decode.recommend import catalogue_trie
        from .rewards import HitReward, beam_decoder

        eos = model.tokenizer.eos_token_id
        reward = HitReward(beam_decoder(catalogue_trie(dataset.items, pb)), eos_id=eos)
    return GRPOTrainer(model, grpo_cfg, train, reward=reward, valid_data=valid).train()


def evaluate_models(
    cfg: RunConfig, dataset: Any, models: dict[str, Any], out: Path
) -> list[dict[str, Any]]:
    """Evaluate each model under each length penalty (exact ranking scores the catalogue once
    for all penalties); write predictions; return records."""
    from ..eval import evaluate_scorings
    from ..eval.report import scoring_name

    records = []
    lps = list(cfg.length_penalty)
    for stage, model in models.items():
        names = [scoring_name(lp) for lp in lps]
        results = evaluate_scorings(
            model,
            dataset,
            lps,
            split="test",
            num_beams=cfg.num_beams,
            rank=cfg.rank,
            stop_rule=cfg.beam_stop,
            max_samples=cfg.max_eval_samples,
            batch_size=cfg.eval_batch_size,
            prompt_builder=prompt_builder(cfg, model, dataset),
            predictions_paths=[out / f"predictions-{stage}-{name}.jsonl" for name in names],
            desc=MODEL_NAMES.get(stage, stage),
            exclude_seen=cfg.exclude_seen,
        )
        for lp, scoring, res in zip(lps, names, results):
            rec = {"model": MODEL_NAMES.get(stage, stage), "stage": stage, "scoring": scoring}
            rec["length_penalty"] = lp
            rec.update(res.metrics)
            records.append(rec)
    return records


def latent_usage_of(
    cfg: RunConfig, dataset: Any, models: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The swap test (eval/latent_usage.py) on the first validation rows of each latent model
    (at most ``LATENT_USAGE_ROWS``: two prompt forwards per row, and the NLL mean is already
    tight there)."""
    from ..eval.latent_usage import latent_usage

    out: dict[str, dict[str, Any]] = {}
    limit = min(cfg.max_eval_samples or LATENT_USAGE_ROWS, LATENT_USAGE_ROWS)
    for stage, model in models.items():
        rows = dataset.valid[:limit]
        if model.num_latent < 1 or len(rows) < 2:
            continue
        samples = prompt_builder(cfg, model, dataset).encode_many(rows)
        usage = latent_usage(model, samples, batch_size=cfg.eval_batch_size)
        out[MODEL_NAMES.get(stage, stage)] = usage.as_dict()
    return out


def popularity_baseline(
    dataset: Any, max_samples: int | None, exclude_seen: bool = False
) -> dict[str, Any]:
    """HR/NDCG of ranking items by train popularity (a sanity floor for every model); with
    ``exclude_seen`` each row's history titles are skipped, as for the models."""
    from ..eval import metrics_from_ranks

    order = sorted(range(len(dataset.popularity)), key=lambda i: -int(dataset.popularity[i]))
    titles = dataset.items.titles
    top_titles: list[str] = []
    for i in order:  # distinct titles, in popularity order (20 + room for a 10-item history)
        if titles[i] not in top_titles:
            top_titles.append(titles[i])
        if len(top_titles) == 30:
            break
    ranks = []
    for s in dataset.test[:max_samples]:
        seen = set(s.history_titles) if exclude_seen else set()
        ranked = [t for t in top_titles if t not in seen][:20]
        ranks.append(ranked.index(s.target_title) if s.target_title in ranked else None)
    rec = {"model": "popularity", "stage": "popularity", "scoring": "-"}
    rec.update(metrics_from_ranks(ranks))
    return rec


def below_popularity(records: list[dict[str, Any]], metric: str = "NDCG@10") -> list[str]:
    """One sentence per (model, scoring) whose ``metric`` is below the popularity row's."""
    pop = next((r for r in records if r.get("stage") == "popularity"), None)
    if pop is None or pop.get(metric) is None:
        return []
    out = []
    for r in records:
        if r.get("stage") == "popularity" or r.get(metric) is None:
            continue
        if r[metric] < pop[metric]:
            out.append(
                f"{r['model']} ({r['scoring']}) is below the popularity baseline: {metric} "
                f"{r[metric]:.4f} vs {pop[metric]:.4f}. It has not learned more than item "
                "popularity: train longer (--sft-epochs), use a pretrained --model, or tune "
                "--sft-lr."
            )
    return out


def merge_logs(out: Path, stages: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Collect every stage's JSON-lines log into ``train_log.jsonl`` (with a "stage" key)."""
    from ..eval.report import read_jsonl

    logs: dict[str, list[dict[str, Any]]] = {}
    for stage in stages:
        recs = []
        for path in sorted((out / stage).glob("*log*.jsonl")):
            recs += read_jsonl(path)
        if recs:
            logs[stage] = recs
    with (out / "train_log.jsonl").open("w", encoding="utf-8") as f:
        for stage, recs in logs.items():
            for r in recs:
                f.write(json.dumps({"stage": stage, **r}) + "\n")
    return logs


# ----------------------------------------------------------------------------- main flow
def run(cfg: RunConfig, print_fn=print) -> list[dict[str, Any]]:
    """Run the configured stages; returns the evaluation records (empty without eval)."""
    from ..eval.report import (
        group_gain_table,
        grpo_selection_summary,
        make_plots,
        results_table,
        write_report,
    )

    rank, world = init_distributed()
    say = print_fn if rank == 0 else (lambda *a, **k: None)
    # bad --data / --model / --device ... fail BEFORE any data loads or anything is written to
    # --output-dir (a failed start must not leave a "run" there that blocks the next command)
    check_model_path(cfg)
    check_runtime(cfg)
    threads, why = apply_threads(cfg.threads)
    say(f"threads: {threads} ({why}; --threads N to change)")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    dataset = load_data(cfg)
    data_s = time.perf_counter() - t0
    out = prepare_output_dir(cfg, dataset, rank)
    timings: dict[str, float] = {}

    def timed(stage: str, seconds: float, resumed: bool) -> None:
        if rank == 0:
            timings.update(record_timing(out, stage, seconds, resumed=resumed))

    timed("data", data_s, resumed=False)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    say(
        f"data: {dataset.name} ({len(dataset.train)}/{len(dataset.valid)}/{len(dataset.test)} "
        f"train/valid/test rows, {len(dataset.items)} items, category {dataset.category!r})"
    )
    if cfg.model is None:
        say(
            f"backbone: tiny Qwen2 ({cfg.tiny_layers} layer(s) x {cfg.tiny_hidden_size}) trained "
            f"from scratch, tiny-backbone profile (--sft-lr {cfg.sft_lr:g}, --sft-batch-size "
            f"{cfg.sft_batch_size}, --sft-epochs {cfg.sft_epochs:g}); --model for a pretrained LM"
        )
    stages = ["sft", "grpo", "eval"] if cfg.stage == "all" else [cfg.stage]
    models: dict[str, Any] = {}
    tokenizer = None

    if "sft" in stages:
        t = time.perf_counter()
        model = build_model(cfg, dataset, cfg.num_latent)
        tokenizer = model.tokenizer
        say(f"SFT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        run_sft(cfg, model, dataset, out / "sft")
        save_stage_model(model, out, "sft", rank)
        models["sft"] = model
        timed("sft", time.perf_counter() - t, cfg.resume)
        if cfg.stage == "all" and cfg.baseline and cfg.num_latent > 0:
            t = time.perf_counter()
            base = build_model(cfg, dataset, 0, tokenizer=_fresh_tokenizer(tokenizer))
            say("SFT of the 'w/o reasoning' baseline (num_latent=0, same budget)")
            run_sft(cfg, base, dataset, out / "sft_baseline")
            save_stage_model(base, out, "sft_baseline", rank)
            models["sft_baseline"] = base
            timed("sft_baseline", time.perf_counter() - t, cfg.resume)
        barrier()

    if "grpo" in stages:
        t = time.perf_counter()
        if "sft" in models:
            # GRPO trains this object in place: evaluate "SFT only" from its saved copy
            model = load_stage_model(cfg, out, "sft")
        else:
            model = (
                load_stage_model(cfg, out, "sft")
                if cfg.model is None or (out / "sft" / "model").is_dir()
                else build_model(cfg, dataset, cfg.num_latent)
            )
        run_grpo(cfg, model, dataset, out / "grpo")
        save_stage_model(model, out, "grpo", rank)
        models["grpo"] = model
        timed("grpo", time.perf_counter() - t, cfg.resume)
        barrier()

    records: list[dict[str, Any]] = []
    if "eval" in stages and rank == 0:
        t = time.perf_counter()
        to_eval: dict[str, Any] = {}
        for stage in ("sft_baseline", "sft", "grpo"):
            if stage in models:
                to_eval[stage] = models[stage]
            elif (out / stage / "model").is_dir():
                to_eval[stage] = load_stage_model(cfg, out, stage)
        if not to_eval:
            raise ConfigError(
                f"--stage eval: no trained model in {out} (expected sft/model or grpo/model)"
            )
        records = evaluate_models(cfg, dataset, to_eval, out)
        records.append(popularity_baseline(dataset, cfg.max_eval_samples, cfg.exclude_seen))
        usage = latent_usage_of(cfg, dataset, to_eval)
        if usage:
            (out / "latent_usage.json").write_text(json.dumps(usage, indent=2), encoding="utf-8")
        timed("eval", time.perf_counter() - t, False)
        (out / "metrics.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
        logs = merge_logs(out, ["sft", "sft_baseline", "grpo"])
        gains = group_gain_table(records, "w/o reasoning", "LatentR3") if "grpo" in to_eval else []
        plots, note = make_plots(out, logs, [r for r in records if r["stage"] != "popularity"])
        val_path = out / "grpo" / "validation.json"
        grpo_val = None
        if "grpo" in to_eval and val_path.is_file():
            grpo_val = json.loads(val_path.read_text(encoding="utf-8"))
        timings = load_timings(out)
        timings["total"] = sum(timings.values())
        below = below_popularity(records)
        write_report(
            out / "report.md",
            records,
            timings,
            dataclasses.asdict(cfg),
            gains=gains,
            plots=plots,
            notes=[note] if note else [],
            latent_usage=usage,
            grpo_validation=grpo_val,
            below_popularity=below,
        )
        say("")
        say(results_table(records))
        if grpo_val:
            say(grpo_selection_summary(grpo_val))
        for name, u in usage.items():
            say(
                f"latent swap test, {name}: validation NLL {u['nll']:.4f} own latent vs "
                f"{u['nll_swapped']:.4f} another row's ({100 * u['relative_gap']:+.2f} %)"
            )
        for line in below:
            say(f"note: {line}")
        say(
            f"\nresults, predictions and report.md in {out} ({time.perf_counter() - t0:.0f} s; "
            "report.md times every invocation of this run)"
        )
    return records


def _fresh_tokenizer(tokenizer: Any) -> Any:
    import copy

    return copy.deepcopy(tokenizer)

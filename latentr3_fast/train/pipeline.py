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

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from .distributed import barrier, init_distributed
from .rundir import (  # noqa: F401 (RUN_MARKERS: API)
    RUN_MARKERS,
    load_stage_model,
    load_timings,
    merge_logs,
    record_timing,
    save_stage_model,
)
from .rundir import prepare_output_dir as _prepare_output_dir
from .runtime import apply_threads, check_runtime

MODEL_NAMES = {"sft_baseline": "w/o reasoning", "sft": "SFT only", "grpo": "LatentR3"}
LATENT_USAGE_ROWS = 1000  # validation rows of the CLI's latent swap test


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
        from .rollout_rewards import HitReward, beam_decoder

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
    ``exclude_seen`` each row's history titles are skipped, as for the models. Titles match by
    ``normalize_title``, the rule of the evaluation."""
    from ..eval import metrics_from_ranks, normalize_title

    order = sorted(range(len(dataset.popularity)), key=lambda i: -int(dataset.popularity[i]))
    top_titles: list[str] = []
    for i in order:  # distinct titles, in popularity order (20 + room for a 10-item history)
        title = normalize_title(dataset.items.titles[i])
        if title not in top_titles:
            top_titles.append(title)
        if len(top_titles) == 30:
            break
    ranks = []
    for s in dataset.test[:max_samples]:
        seen = {normalize_title(t) for t in s.history_titles} if exclude_seen else set()
        ranked = [t for t in top_titles if t not in seen][:20]
        target = normalize_title(s.target_title)
        ranks.append(ranked.index(target) if target in ranked else None)
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


# ----------------------------------------------------------------------------- main flow
@dataclass
class RunState:
    """What the stage steps of one invocation share."""

    cfg: RunConfig
    rank: int
    say: Callable[..., None]  # print on rank 0, nothing elsewhere
    dataset: Any
    out: Path
    started: float  # time.perf_counter() at the start of the invocation
    models: dict[str, Any] = field(default_factory=dict)  # stage -> model trained here

    def timed(self, stage: str, seconds: float, resumed: bool) -> None:
        """Record a stage's wall time (rank 0) for the report."""
        if self.rank == 0:
            record_timing(self.out, stage, seconds, resumed=resumed)


def run(cfg: RunConfig, print_fn: Callable[..., None] = print) -> list[dict[str, Any]]:
    """Run the configured stages; returns the evaluation records (empty without eval)."""
    state = start_run(cfg, print_fn)
    stages = ["sft", "grpo", "eval"] if cfg.stage == "all" else [cfg.stage]
    if "sft" in stages:
        sft_stage(state)
    if "grpo" in stages:
        grpo_stage(state)
    if "eval" in stages and state.rank == 0:
        return eval_stage(state)
    return []


def start_run(cfg: RunConfig, print_fn: Callable[..., None]) -> RunState:
    """Check the machine, load the data, claim --output-dir and describe the run."""
    rank, _ = init_distributed()
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
    state = RunState(cfg, rank, say, dataset, out, started=t0)
    state.timed("data", data_s, resumed=False)
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
    return state


def sft_stage(state: RunState) -> None:
    """Stage 1 (paper Sec. 3.2.1); in ``--stage all`` also the 'w/o reasoning' baseline, the
    same model and budget without latent reasoning (num_latent=0)."""
    cfg, dataset, out = state.cfg, state.dataset, state.out
    t = time.perf_counter()
    model = build_model(cfg, dataset, cfg.num_latent)
    state.say(f"SFT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    run_sft(cfg, model, dataset, out / "sft")
    save_stage_model(model, out, "sft", state.rank)
    state.models["sft"] = model
    state.timed("sft", time.perf_counter() - t, cfg.resume)
    if cfg.stage == "all" and cfg.baseline and cfg.num_latent > 0:
        t = time.perf_counter()
        base = build_model(cfg, dataset, 0, tokenizer=copy.deepcopy(model.tokenizer))
        state.say("SFT of the 'w/o reasoning' baseline (num_latent=0, same budget)")
        run_sft(cfg, base, dataset, out / "sft_baseline")
        save_stage_model(base, out, "sft_baseline", state.rank)
        state.models["sft_baseline"] = base
        state.timed("sft_baseline", time.perf_counter() - t, cfg.resume)
    barrier()


def grpo_stage(state: RunState) -> None:
    """Stage 2 (paper Sec. 3.2.2), starting from the saved SFT model (or, with a pretrained
    --model and no SFT stage, from the pretrained backbone)."""
    cfg, out = state.cfg, state.out
    t = time.perf_counter()
    # GRPO trains its model in place: "SFT only" stays the object trained by sft_stage
    if "sft" in state.models or cfg.model is None or (out / "sft" / "model").is_dir():
        model = load_stage_model(cfg, out, "sft")
    else:
        model = build_model(cfg, state.dataset, cfg.num_latent)
    run_grpo(cfg, model, state.dataset, out / "grpo")
    save_stage_model(model, out, "grpo", state.rank)
    state.models["grpo"] = model
    state.timed("grpo", time.perf_counter() - t, cfg.resume)
    barrier()


def eval_stage(state: RunState) -> list[dict[str, Any]]:
    """Evaluate every trained model (rank 0), write metrics, logs and the report, print the
    results table; returns the evaluation records."""
    cfg, dataset, out = state.cfg, state.dataset, state.out
    t = time.perf_counter()
    models = models_to_evaluate(state)
    records = evaluate_models(cfg, dataset, models, out)
    records.append(popularity_baseline(dataset, cfg.max_eval_samples, cfg.exclude_seen))
    usage = latent_usage_of(cfg, dataset, models)
    if usage:
        (out / "latent_usage.json").write_text(json.dumps(usage, indent=2), encoding="utf-8")
    state.timed("eval", time.perf_counter() - t, False)
    (out / "metrics.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    val_path = out / "grpo" / "validation.json"
    grpo_val = None
    if "grpo" in models and val_path.is_file():
        grpo_val = json.loads(val_path.read_text(encoding="utf-8"))
    results = EvalResults(records, usage, grpo_val, below_popularity(records))
    write_run_report(state, results, with_grpo="grpo" in models)
    print_results(state, results)
    return records


@dataclass
class EvalResults:
    """What the evaluation stage reports."""

    records: list[dict[str, Any]]  # one per (model, scoring), plus the popularity row
    latent_usage: dict[str, dict[str, Any]]  # model name -> swap test
    grpo_validation: Any  # grpo/validation.json, when GRPO was evaluated
    below_popularity: list[str]  # one sentence per model below the popularity row


def models_to_evaluate(state: RunState) -> dict[str, Any]:
    """The models trained in this invocation, plus those saved by earlier ones."""
    found: dict[str, Any] = {}
    for stage in ("sft_baseline", "sft", "grpo"):
        if stage in state.models:
            found[stage] = state.models[stage]
        elif (state.out / stage / "model").is_dir():
            found[stage] = load_stage_model(state.cfg, state.out, stage)
    if not found:
        raise ConfigError(
            f"--stage eval: no trained model in {state.out} (expected sft/model or grpo/model)"
        )
    return found


def write_run_report(state: RunState, results: EvalResults, with_grpo: bool) -> None:
    """Merge the logs, draw the plots and write ``report.md`` (timings of every invocation)."""
    from ..eval.report import group_gain_table, make_plots, write_report

    out, records = state.out, results.records
    logs = merge_logs(out, ["sft", "sft_baseline", "grpo"])
    gains = group_gain_table(records, "w/o reasoning", "LatentR3") if with_grpo else []
    plots, note = make_plots(out, logs, [r for r in records if r["stage"] != "popularity"])
    timings = load_timings(out)
    timings["total"] = sum(timings.values())
    write_report(
        out / "report.md",
        records,
        timings,
        dataclasses.asdict(state.cfg),
        gains=gains,
        plots=plots,
        notes=[note] if note else [],
        latent_usage=results.latent_usage,
        grpo_validation=results.grpo_validation,
        below_popularity=results.below_popularity,
    )


def print_results(state: RunState, results: EvalResults) -> None:
    """The results table and the notes under it."""
    from ..eval.report import grpo_selection_summary, results_table

    say = state.say
    say("")
    say(results_table(results.records))
    if results.grpo_validation:
        say(grpo_selection_summary(results.grpo_validation))
    for name, u in results.latent_usage.items():
        say(
            f"latent swap test, {name}: validation NLL {u['nll']:.4f} own latent vs "
            f"{u['nll_swapped']:.4f} another row's ({100 * u['relative_gap']:+.2f} %)"
        )
    for line in results.below_popularity:
        say(f"note: {line}")
    say(
        f"\nresults, predictions and report.md in {state.out} "
        f"({time.perf_counter() - state.started:.0f} s; "
        "report.md times every invocation of this run)"
    )

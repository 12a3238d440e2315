"""The output directory of a CLI run: what each stage writes, what ``--overwrite`` replaces, the
run's fingerprint (data + model-shaping options) that ``--resume`` and later stages check, the
stages' saved models, timings and merged logs.

Rules (``python -m latentr3_fast.train --stage S``):

* a stage never deletes what another stage wrote; ``--overwrite`` replaces only the outputs of
  the requested stage(s) (``--stage all``: everything);
* ``--stage eval`` on a finished run re-evaluates (no flag needed): it rewrites only the
  evaluation outputs;
* ``--stage sft|grpo|all`` refuses to start over outputs of its own stage unless ``--resume``
  (continue them) or ``--overwrite`` (replace them) is given;
* whenever outputs of an earlier invocation are reused (``--resume``, ``--stage grpo`` on a
  finished SFT, ``--stage eval``), the data and the options that shape the model must be the
  ones the run was made with (``run.json``); otherwise one line names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FINGERPRINT_NAME = "run.json"
TIMINGS_NAME = "timings.json"

# What each stage writes (directories, files and glob patterns relative to the output dir).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "sft": ("sft", "sft_baseline"),
    "grpo": ("grpo",),
    "eval": (
        "metrics.json",
        "predictions-*.jsonl",
        "latent_usage.json",
        "train_log.jsonl",
        "report.md",
        "*.png",
    ),
}
RUN_MARKERS = ("metrics.json", "sft", "sft_baseline", "grpo")  # config.yaml alone: a failed start

# Options that change the model or what it is trained on (besides the data themselves).
MODEL_SHAPING = (
    "model",
    "num_latent",
    "latent_mode",
    "template",
    "category",
    "max_length",
    "max_train_samples",
)
TINY_SHAPING = ("tiny_hidden_size", "tiny_layers", "tokenizer_vocab", "seed")


def stage_outputs(out: Path, stage: str) -> list[Path]:
    """Existing paths written by ``stage`` (``all``: every stage) in ``out``."""
    stages = ("sft", "grpo", "eval") if stage == "all" else (stage,)
    found: list[Path] = []
    for s in stages:
        for pattern in STAGE_OUTPUTS[s]:
            found += sorted(out.glob(pattern)) if "*" in pattern else [out / pattern]
    return [p for p in found if p.exists()]


def data_fingerprint(dataset: Any) -> str:
    """sha256 (16 hex digits) of the catalogue titles and every sample's ids of all splits."""
    h = hashlib.sha256()
    h.update(json.dumps(list(dataset.items.titles)).encode("utf-8"))
    for split in ("train", "valid", "test"):
        h.update(split.encode())
        for s in getattr(dataset, split):
            h.update(f"{s.history_ids}>{s.target_id};".encode())
    return h.hexdigest()[:16]


def run_fingerprint(cfg: Any, dataset: Any) -> dict[str, Any]:
    """The record written to ``run.json``: the data's hash and sizes, and the model-shaping
    options (the tiny backbone's own options only when it is used)."""
    keys = MODEL_SHAPING + (TINY_SHAPING if cfg.model is None else ())
    return {
        "data": cfg.data,
        "data_sha256": data_fingerprint(dataset),
        "data_rows": [len(dataset.train), len(dataset.valid), len(dataset.test)],
        "data_items": len(dataset.items),
        "options": {k: getattr(cfg, k, None) for k in keys},
    }


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A short phrase naming what differs between two fingerprints (None when equal)."""
    if old.get("data_sha256") != new.get("data_sha256"):
        return (
            f"the data differ (run: {old.get('data')}, {_sizes(old)}; now: {new.get('data')}, "
            f"{_sizes(new)}; sha256 {old.get('data_sha256')} vs {new.get('data_sha256')})"
        )
    o, n = old.get("options", {}), new.get("options", {})
    changed = [k for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    if changed:
        return ", ".join(
            f"--{k.replace('_', '-')} {n.get(k)!r} (run: {o.get(k)!r})" for k in changed
        )
    return None


def _sizes(fp: dict[str, Any]) -> str:
    rows = fp.get("data_rows") or ["?", "?", "?"]
    return f"{rows[0]}/{rows[1]}/{rows[2]} rows, {fp.get('data_items', '?')} items"


def prepare_output_dir(cfg: Any, dataset: Any, *, write: bool = True) -> Path:
    """Check ``--output-dir`` against the rules above, delete what ``--overwrite`` replaces and
    write the fingerprint. ``write=False`` (ranks other than 0) only checks."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    fp = run_fingerprint(cfg, dataset)
    replace_all = cfg.overwrite and not cfg.resume and cfg.stage == "all"
    if holds_run and not replace_all:
        old = _read_fingerprint(out)
        diff = fingerprint_difference(old, fp) if old is not None else None
        if diff is not None:
            how = "--resume" if cfg.resume else f"--stage {cfg.stage}"
            raise ConfigError(
                f"{how}: the run in {out} was made with other settings: {diff}; use another "
                "--output-dir, or --stage all --overwrite to replace the whole run"
            )
        own = stage_outputs(out, cfg.stage) if cfg.stage != "eval" else []
        if own and not (cfg.resume or cfg.overwrite):
            names = ", ".join(p.name for p in own)
            raise ConfigError(
                f"--output-dir {out} already holds {names} (written by --stage {cfg.stage}); "
                f"pass --resume to continue, or --overwrite to replace only what --stage "
                f"{cfg.stage} writes"
            )
    if write:
        if holds_run and cfg.overwrite and not cfg.resume:
            for p in stage_outputs(out, cfg.stage):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if replace_all:
                for name in (FINGERPRINT_NAME, TIMINGS_NAME):
                    (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / FINGERPRINT_NAME).is_file():
            (out / FINGERPRINT_NAME).write_text(json.dumps(fp, indent=2), encoding="utf-8")
    return out


def _read_fingerprint(out: Path) -> dict[str, Any] | None:
    path = out / FINGERPRINT_NAME
    if not path.is_file():
        return None  # a run from before fingerprints: nothing to compare
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); remove it to skip the check") from exc


def load_timings(out: Path) -> dict[str, float]:
    """Seconds per stage of every earlier invocation of this run (``timings.json``)."""
    path = out / TIMINGS_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        raw = {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


def record_timing(out: Path, stage: str, seconds: float, *, resumed: bool) -> dict[str, float]:
    """Add (resumed stage) or set (fresh stage) a stage's seconds in ``timings.json``."""
    timings = load_timings(out)
    timings[stage] = (timings.get(stage, 0.0) if resumed else 0.0) + seconds
    (out / TIMINGS_NAME).write_text(json.dumps(timings, indent=2), encoding="utf-8")
    return timings


def load_stage_model(cfg: Any, out: Path, stage: str) -> Any:
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

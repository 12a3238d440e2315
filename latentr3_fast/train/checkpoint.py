"""Atomic checkpoints of the trainers (written through :func:`.atomic.atomic_dir`).

Checkpoint layout (``save_checkpoint``)::

    OUT/checkpoints/step-00000042/
        model/                  reasoner.save_pretrained (HF backbone + tokenizer + LatentRATT)
                                or model.safetensors for a plain nn.Module
        optimizer.pt  scheduler.pt  rng.pt
        trainer_state.json      step, data position and whatever the trainer adds
        checkpoint_complete.json   written last: every file's size (checked when listing)
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..errors import TrainingError
from .atomic import atomic_dir, discard_dir, recover_dir
from .rng import get_rng_state, set_rng_state

__all__ = [
    "checkpoint_dirs",
    "is_complete_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "recover_checkpoints",
    "save_checkpoint",
    "save_model_weights",
]

TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
_STEP_DIR = re.compile(r"^step-([0-9]+)$")


def save_model_weights(model: nn.Module, directory: str | Path) -> None:
    """``model.save_pretrained(directory)`` when it has one, else ``model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        save_model(model, str(directory / "model.safetensors"))


def _tied_groups(module: nn.Module) -> dict[str, set[str]]:
    """name -> names sharing the same storage (tied weights) in ``module.state_dict()``."""
    by_ptr: dict[tuple[int, torch.device], set[str]] = {}
    sd = module.state_dict(keep_vars=True)
    for k, v in sd.items():
        by_ptr.setdefault((v.data_ptr(), v.device), set()).add(k)
    return {k: by_ptr[(v.data_ptr(), v.device)] for k, v in sd.items()}


def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Load weights written by :func:`save_model_weights` into an existing ``model`` in place
    (so optimizer references stay valid). Handles sharded HF files and tied weights."""
    directory = Path(directory)
    if not hasattr(model, "backbone"):
        load_model(model, str(directory / "model.safetensors"))
        return
    from ..model.reasoner import RATT_WEIGHTS_NAME

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != RATT_WEIGHTS_NAME)
    if not files:
        raise TrainingError(f"{directory}: no backbone *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    backbone = model.backbone
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    tied = _tied_groups(backbone)
    really_missing = [k for k in missing if not (tied.get(k, {k}) - {k}) & state.keys()]
    if really_missing or unexpected:
        raise TrainingError(
            f"{directory}: backbone weights do not match the model (missing "
            f"{really_missing[:5]}, unexpected {list(unexpected)[:5]})"
        )
    ratt = getattr(model, "ratt", None)
    if ratt is not None:
        ratt.load_state_dict(load_file(str(directory / RATT_WEIGHTS_NAME)))


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a whole checkpoint: every file named by its
    ``checkpoint_complete.json`` exists with the recorded size (``trainer_state.json`` need
    only exist: it may be edited by hand). Checkpoints written before that marker existed need
    ``trainer_state.json``, ``rng.pt`` and a ``*.safetensors`` in ``model``."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
            return all(
                (path / rel).is_file()
                if rel == TRAINER_STATE
                else (path / rel).stat().st_size == size
                for rel, size in files.items()
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return (
        (path / TRAINER_STATE).is_file()
        and (path / "rng.pt").is_file()
        and any((path / "model").glob("*.safetensors"))
    )


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first.

    A checkpoint a killed save had renamed aside (``.step-N.old-PID``, ``step-N`` missing) is
    renamed back first; incomplete ``step-N`` directories are skipped with a warning.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    recover_dir(root, clean=False)
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            if is_complete_checkpoint(p):
                found.append((int(m.group(1)), p))
            else:
                warnings.warn(f"{p}: incomplete checkpoint, ignored", stacklevel=2)
    return [p for _, p in sorted(found)]


def recover_checkpoints(output_dir: str | Path) -> list[Path]:
    """Trainer start: restore a checkpoint a killed save left renamed aside and remove the
    temporary / half-deleted directories of dead writers under ``output_dir/checkpoints``
    (:func:`recover_dir`); returns the complete checkpoints, oldest first. ``save_checkpoint``
    does the same before every save."""
    root = Path(output_dir) / "checkpoints"
    if root.is_dir():
        recover_dir(root)
    return checkpoint_dirs(output_dir)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Atomically write ``output_dir/checkpoints/step-{step:08d}`` and drop older ones beyond
    ``keep_last`` (0 = keep all). ``trainer_state`` (JSON-able) should hold the data position.
    ``extra_weights`` maps a name to a state dict written as ``NAME.safetensors`` inside the
    checkpoint (e.g. GRPO's best weights), covered by the completion marker."""
    final = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    state = {"step": int(step), "time": time.time(), **(trainer_state or {})}

    def write(tmp: Path) -> None:
        save_model_weights(model, tmp / "model")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(get_rng_state(), tmp / "rng.pt")
        for name, tensors in (extra_weights or {}).items():
            flat = {k: v.detach().contiguous() for k, v in tensors.items()}
            save_file(flat, str(tmp / f"{name}.safetensors"))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        # written last: lets listing tell a whole checkpoint from one damaged in place
        files = {
            f.relative_to(tmp).as_posix(): f.stat().st_size
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        marker = {"step": int(step), "files": files}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")

    atomic_dir(final, write)
    if keep_last > 0:
        # rename first, then delete: a kill mid-removal leaves only a hidden .deleting dir
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            discard_dir(old, old.name)
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint into existing objects; returns its ``trainer_state``.

    The ``.pt`` files are our own (optimizer/scheduler/RNG state) and are loaded with
    ``weights_only=False`` because numpy RNG state is not a tensor: load only checkpoints
    you trust.
    """
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise TrainingError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
    if not is_complete_checkpoint(path):
        raise TrainingError(
            f"{path}: not a complete checkpoint (files missing or truncated; see {COMPLETE_MARKER})"
        )
    load_model_weights(model, path / "model")
    dev = next(model.parameters()).device
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dev))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng and (path / "rng.pt").is_file():
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())

"""Loop pieces shared by the SFT and GRPO trainers.

* optimizers: torch AdamW or bitsandbytes 8-bit AdamW (``optim="adamw"|"adamw_8bit"``);
* schedules: warmup then linear / cosine / constant (the Hugging Face formulas);
* gradient clipping and a non-finite guard (skip the step; stop after N in a row);
* seeding and RNG state capture (python, numpy, torch CPU + CUDA);
* atomic checkpoints: everything is written into a temporary sibling directory, then
  ``os.replace``-d into place, so a killed run never leaves a half-written checkpoint; pruned
  checkpoints are renamed to a hidden name before removal, and what killed writers leave
  behind (``.NAME.tmp-PID`` / ``.NAME.old-PID`` / ``.NAME.deleting-PID``) is restored or
  removed by the next save (:func:`recover_dir`);
* a JSON-lines logger (optionally mirrored to TensorBoard) and a tqdm progress bar.

Checkpoint layout (``save_checkpoint``)::

    OUT/checkpoints/step-00000042/
        model/                  reasoner.save_pretrained (HF backbone + tokenizer + LatentRATT)
                                or model.safetensors for a plain nn.Module
        optimizer.pt  scheduler.pt  rng.pt
        trainer_state.json      step, data position and whatever the trainer adds
        checkpoint_complete.json   written last: every file's size (checked when listing)
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..errors import ConfigError, TrainingError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "JsonlLogger",
    "NonFiniteGuard",
    "atomic_dir",
    "build_optimizer",
    "build_scheduler",
    "check_bitsandbytes",
    "checkpoint_dirs",
    "clip_grad_norm",
    "get_rng_state",
    "is_complete_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "lr_lambda",
    "progress_bar",
    "recover_checkpoints",
    "recover_dir",
    "save_checkpoint",
    "save_model_weights",
    "seed_everything",
    "set_rng_state",
]

OPTIMIZERS = ("adamw", "adamw_8bit")
SCHEDULES = ("linear", "cosine", "constant")
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
_STEP_DIR = re.compile(r"^step-([0-9]+)$")
# hidden siblings made by atomic_dir / pruning: .NAME.tmp-PID, .NAME.old-PID, .NAME.deleting-PID
_HIDDEN_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|deleting)-(?P<pid>[0-9]+)$")


# ------------------------------------------------------------------------- seeding / RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All RNG states (python, numpy, torch CPU, torch CUDA when initialised)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- optimizer
def _param_groups(params: nn.Module | Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-D) get none (the HF Trainer rule)."""
    if isinstance(params, nn.Module):
        plist = [p for p in params.parameters() if p.requires_grad]
    else:
        plist = list(params)
        if plist and isinstance(plist[0], dict):  # already param groups
            return plist
        plist = [p for p in plist if p.requires_grad]
    if not plist:
        raise ConfigError("build_optimizer: no trainable parameters")
    decay = [p for p in plist if p.dim() >= 2]
    no_decay = [p for p in plist if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def check_bitsandbytes(what: str) -> None:
    """ConfigError naming ``what`` when bitsandbytes (the ``[bnb]`` extra) is not installed;
    looks the package up without importing it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{what} needs bitsandbytes, which is not installed: "
            "pip install 'latentr3_fast[bnb]' (or use adamw)"
        )


def build_optimizer(
    params: nn.Module | Iterable[Any],
    optim: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of a module (or a parameter list / param groups).

    Args:
        params: module, iterable of parameters, or param-group dicts.
        optim: ``"adamw"`` (torch; fused kernel on CUDA) or ``"adamw_8bit"`` (bitsandbytes;
            needs CUDA).
        lr, weight_decay, betas, eps: the usual AdamW hyper-parameters.
    """
    if optim not in OPTIMIZERS:
        raise ConfigError(f"optim={optim!r}: expected one of {OPTIMIZERS}")
    if not lr > 0:
        raise ConfigError(f"lr={lr}: must be > 0")
    groups = _param_groups(params, weight_decay)
    flat = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in flat)
    if optim == "adamw_8bit":
        check_bitsandbytes("optim='adamw_8bit'")
        if not on_cuda:
            raise ConfigError(
                "optim='adamw_8bit' needs CUDA parameters (bitsandbytes 8-bit AdamW); "
                "use optim='adamw' on CPU"
            )
        try:  # imported only here: bitsandbytes is an optional extra
            import bitsandbytes as bnb
        except Exception as e:  # ImportError or a broken CUDA setup
            raise ConfigError(f"optim='adamw_8bit': bitsandbytes is unusable ({e})") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = on_cuda and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in flat)
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


# ------------------------------------------------------------------------- schedules
def lr_lambda(
    warmup_steps: int, total_steps: int, schedule: str = "linear", min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base lr at scheduler step ``s`` (0-based, before the s-th update).

    Warmup ``s / warmup`` (as Hugging Face's ``get_*_schedule_with_warmup``), then linear decay
    to ``min_lr_ratio`` at ``total_steps``, a half cosine, or constant.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"warmup_steps={warmup_steps}, total_steps={total_steps}: bad values")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio={min_lr_ratio}: must be in [0, 1]")

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = (
            1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        )
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str = "linear",
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with :func:`lr_lambda`; call ``scheduler.step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps, total_steps, schedule, min_lr_ratio)
    )


# ------------------------------------------------------------------------- gradients
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the total L2 grad norm to ``max_norm`` (None/<=0: only measure it).

    Returns the pre-clipping total norm as a 0-d tensor (no host sync here).
    """
    plist = [p for p in params if p.grad is not None]
    if not plist:
        return torch.zeros(())
    limit = max_norm if max_norm is not None and max_norm > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(plist, limit)


class NonFiniteGuard:
    """Skips steps whose loss / grad norm is NaN or inf; raises after ``max_bad_steps`` in a row.

    Usage: ``if guard.ok(loss, grad_norm): optimizer.step() else: optimizer.zero_grad()``.
    The trainer's last checkpoint stays the last good state (nothing is saved from a bad step).
    """

    def __init__(
        self,
        max_bad_steps: int = 5,
        where: str = "training",
        output_dir: str | Path | None = None,
    ) -> None:
        """``output_dir`` (optional): where the trainer checkpoints, so the error can name the
        last good checkpoint (looked up only when raising)."""
        if max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps={max_bad_steps}: must be >= 1")
        self.max_bad_steps = max_bad_steps
        self.where = where
        self.output_dir = output_dir
        self.consecutive = 0
        self.total = 0

    def ok(self, *values: torch.Tensor | float, step: int | None = None) -> bool:
        """True when every value is finite; otherwise count it (and raise at the limit).

        ``step`` (optional): the 1-based number of the step these values belong to; the
        error then says at which step training stopped.
        """
        finite = all(
            bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)
            for v in values
        )
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad_steps:
            at = ""
            if step is not None:
                first = int(step) - self.consecutive + 1
                at = f" at step {int(step)} (non-finite since step {first})"
            last = None
            if self.output_dir is not None:
                try:
                    last = latest_checkpoint(self.output_dir)
                except OSError:  # only decorates the message: never hide the real error
                    last = None
            kept = (
                f"The last good checkpoint is kept at {last}."
                if last is not None
                else "The last checkpoint written before them (if any) is intact."
            )
            raise TrainingError(
                f"{self.where}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient norm{at} (max_bad_steps={self.max_bad_steps}); stopping. {kept}"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))


# ------------------------------------------------------------------------- checkpoints
def _pid_in_flight(pid: int) -> bool:
    """True when ``pid`` may still be writing: another live process. Our own pid is never
    in flight here (saves are sequential within a process); zombies count as dead."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, OSError):
        return False
    try:  # Linux: a killed but not yet reaped child is a zombie ("Z"), not a writer
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")
    except (OSError, ValueError):
        return True


def _discard(path: Path, name: str) -> None:
    """Remove a directory so that a kill at any point leaves only a hidden
    ``.NAME.deleting-PID`` (never a half-removed ``NAME`` or ``.NAME.old``)."""
    doomed = path.with_name(f".{name}.deleting-{os.getpid()}")
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        except OSError:
            doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def recover_dir(parent: str | Path, clean: bool = True) -> list[Path]:
    """Repair what killed :func:`atomic_dir` calls (or prunes) left in ``parent``.

    * ``.NAME.old-PID`` of a dead writer while ``NAME`` is missing (killed between the two
      renames of a replace): renamed back to ``NAME`` -- it is the complete previous version.
    * with ``clean``: stale ``.NAME.tmp-PID`` (partial writes), ``.NAME.deleting-PID``
      (interrupted removals) and superfluous ``.NAME.old-PID`` are removed.

    Entries of other live processes are left alone (pid check; pids are per machine, so
    writers on several hosts must not share one directory). Returns the restored paths.
    """
    parent = Path(parent)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    olds: dict[str, list[Path]] = {}
    for p in entries:
        m = _HIDDEN_DIR.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        if _pid_in_flight(int(m["pid"])):
            continue
        if m["kind"] == "old":
            olds.setdefault(m["name"], []).append(p)
        elif clean:
            shutil.rmtree(p, ignore_errors=True)
    restored = []
    for name, cands in olds.items():
        target = parent / name
        if not target.exists():
            cands.sort(key=lambda c: c.stat().st_mtime if c.exists() else -1.0)
            best = cands.pop()
            try:
                os.replace(best, target)
                restored.append(target)
            except OSError:  # another process restored it first, or a read-only directory
                pass
        if clean:
            for c in cands:
                _discard(c, name)
    return restored


def atomic_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling directory, then rename it to ``final``.

    An existing ``final`` is replaced only after the new one is complete: it is first renamed
    to ``.NAME.old-PID``, so at every moment one complete version exists under ``final`` or
    that name; a kill between the two renames is repaired by :func:`recover_dir` (run at the
    start of every call and by :func:`checkpoint_dirs`), which also removes the temporary
    directories of killed writers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        _discard(old, final.name)
    return final


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
            _discard(old, old.name)
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


# ------------------------------------------------------------------------- logging
class JsonlLogger:
    """Appends one JSON object per ``log`` call to ``path`` (flushed at once); optionally
    mirrors numeric fields to TensorBoard (``tensorboard_dir``; needs the tensorboard package).

    ``resume_step``: the step of the checkpoint a run continues from. Records an earlier,
    killed run logged after that checkpoint (``step > resume_step``, and step-less records
    after the first of them) would be logged again by the resumed run, so they are dropped
    first (the file is rewritten atomically; a torn last line goes too). ``None`` (default):
    plain append. A file whose last line was torn by a kill gets a newline before appending.
    """

    def __init__(
        self,
        path: str | Path | None,
        tensorboard_dir: str | Path | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._drop_after(int(resume_step))
            self._fh = self.path.open("a", encoding="utf-8")
            if self._fh.tell() > 0 and not self._ends_with_newline():
                self._fh.write("\n")  # do not glue the next record onto a torn line
                self._fh.flush()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:
                raise ConfigError(
                    f"tensorboard=True needs the tensorboard package ({e}); pip install tensorboard"
                ) from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:  # type: ignore[union-attr]
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _drop_after(self, resume_step: int) -> None:
        """Rewrite the log without the records logged after step ``resume_step``."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")  # type: ignore[union-attr]
        except FileNotFoundError:
            return
        kept: list[str] = []
        dropping = False
        lines = text.split("\n")
        torn = lines[-1] != ""  # a kill mid-write leaves a last line without its newline
        for line in lines[:-1] if not torn else lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line: never a whole record
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int | float) and step > resume_step:
                dropping = True
                continue
            if step is None and dropping:
                continue
            kept.append(line)
        new = "".join(line + "\n" for line in kept)
        if new == text:
            return
        path: Path = self.path  # type: ignore[assignment]
        for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # killed rewrites
            m = _HIDDEN_DIR.match(stale.name)
            if m and stale.is_file() and not _pid_in_flight(int(m["pid"])):
                stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        """Write ``record`` (plus ``step`` and wall time) as one line."""
        rec = {"time": round(time.time(), 3)}
        if step is not None:
            rec["step"] = int(step)
        for k, v in record.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            rec[k] = v
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        if self._tb is not None and step is not None:
            for k, v in rec.items():
                if k not in ("time", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", enabled: bool = True, initial: int = 0):
    """A tqdm bar (disabled → a silent one with the same interface)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True)

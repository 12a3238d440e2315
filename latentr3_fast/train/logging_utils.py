"""Training logs: a JSON-lines logger (optionally mirrored to TensorBoard) and a progress bar."""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .atomic import HIDDEN_ENTRY, writer_alive

__all__ = ["JsonlLogger", "progress_bar"]


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
            m = HIDDEN_ENTRY.match(stale.name)
            if m and stale.is_file() and not writer_alive(int(m["pid"])):
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


def progress_bar(total: int | None, desc: str = "", enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar (disabled → a silent one with the same interface)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True)

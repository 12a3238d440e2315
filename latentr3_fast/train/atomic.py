"""Crash-safe directory writes: checkpoints and ``best/`` copies appear whole or not at all.

Everything is written into a temporary sibling directory, then ``os.replace``-d into place, so
a killed run never leaves a half-written directory; removed directories are renamed to a
hidden name first, and what killed writers leave behind (``.NAME.tmp-PID`` /
``.NAME.old-PID`` / ``.NAME.deleting-PID``) is restored or removed by the next write
(:func:`recover_dir`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["HIDDEN_ENTRY", "atomic_dir", "discard_dir", "recover_dir", "writer_alive"]

# hidden siblings made by atomic_dir / pruning: .NAME.tmp-PID, .NAME.old-PID, .NAME.deleting-PID
HIDDEN_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|deleting)-(?P<pid>[0-9]+)$")


def writer_alive(pid: int) -> bool:
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


def discard_dir(path: Path, name: str) -> None:
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
        m = HIDDEN_ENTRY.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        if writer_alive(int(m["pid"])):
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
                discard_dir(c, name)
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
        discard_dir(old, final.name)
    return final

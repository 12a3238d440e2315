"""Split a large file into parts and join them back, verified by SHA-256.

For machines that accept only a limited amount of files per run (e.g. 64 MiB): send the parts
in consecutive runs, keep them on the machine, join them there. ``join`` checks every part's
size and hash and the whole file's hash against the manifest, so a missing, truncated or mixed
up part is an error naming that part, never a silently corrupt model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import ConfigError

__all__ = ["MANIFEST", "join_parts", "split_file"]

MANIFEST = "manifest.json"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_file(path: str | Path, out_dir: str | Path, max_bytes: int) -> list[Path]:
    """Cut ``path`` into ``ceil(size / max_bytes)`` parts ``<name>.partNN`` in ``out_dir``.

    Also writes ``manifest.json`` (file name, size, SHA-256 of the file and of each part).
    Returns the part paths in order.
    """
    src = Path(path)
    if not src.is_file():
        raise ConfigError(f"{src}: no such file to split")
    if max_bytes < 1:
        raise ConfigError(f"max_bytes {max_bytes}: must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    parts: list[dict[str, object]] = []
    paths: list[Path] = []
    with src.open("rb") as f:
        i = 0
        while True:
            block = f.read(max_bytes)
            if not block and i > 0:
                break
            whole.update(block)
            p = out / f"{src.name}.part{i:02d}"
            p.write_bytes(block)
            parts.append({"name": p.name, "size": len(block), "sha256": _sha256_bytes(block)})
            paths.append(p)
            i += 1
            if len(block) < max_bytes:
                break
    manifest = {
        "name": src.name,
        "size": src.stat().st_size,
        "sha256": whole.hexdigest(),
        "parts": parts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def join_parts(parts_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Join the parts listed in ``parts_dir/manifest.json`` into ``out_path``.

    Default output: ``parts_dir/<name>``. Written to a temporary file and renamed only after
    the whole file's hash matches. Raises ConfigError naming the first bad or missing part.
    """
    d = Path(parts_dir)
    mf = d / MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{mf}: no manifest (run split first)")
    try:
        manifest = json.loads(mf.read_text())
        parts = manifest["parts"]
        name, size, digest = manifest["name"], int(manifest["size"]), manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{mf}: invalid manifest ({exc})") from exc
    out = Path(out_path) if out_path is not None else d / name
    for part in parts:  # check all parts before writing anything
        p = d / part["name"]
        if not p.is_file():
            raise ConfigError(f"{p}: part missing ({len(parts)} parts expected)")
        if p.stat().st_size != int(part["size"]):
            raise ConfigError(f"{p}: {p.stat().st_size} bytes, manifest says {part['size']}")
    tmp = out.with_name(out.name + ".joining")
    whole = hashlib.sha256()
    try:
        with tmp.open("wb") as fout:
            for part in parts:
                p = d / part["name"]
                data = p.read_bytes()
                if _sha256_bytes(data) != part["sha256"]:
                    raise ConfigError(f"{p}: SHA-256 differs from the manifest (corrupt part)")
                whole.update(data)
                fout.write(data)
        if whole.hexdigest() != digest or tmp.stat().st_size != size:
            raise ConfigError(f"{out}: joined file does not match the manifest's SHA-256")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def copy_parts(parts: list[Path], dest: str | Path) -> None:
    """Copy part files (and nothing else) into ``dest`` (used between consecutive runs)."""
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for p in parts:
        shutil.copy2(p, d / p.name)

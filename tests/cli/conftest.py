"""Helpers for the CLI tests: run ``python -m latentr3_fast.train`` in a subprocess on tiny
settings (about 8 s per stage on one CPU thread, mostly imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# tiny data + model + budgets shared by every run (so runs are comparable)
TINY = [
    "--synthetic-items", "60",
    "--synthetic-users", "80",
    "--tiny-hidden-size", "32",
    "--max-train-samples", "64",
    "--max-eval-samples", "8",
    "--num-beams", "2",
    "--max-steps", "2",
    "--prompts-per-step", "4",
    "--num-generations", "2",
]  # fmt: skip


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        tail = f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        return f"rc={self.returncode}\n{tail}"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    *,
    tiny: bool = True,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> Result:
    """Run the CLI (``prefix`` replaces ``python -m latentr3_fast.train``, e.g. a wrapper
    script or torchrun) with the TINY settings first, so ``args`` override them; returns its
    exit code and output."""
    cmd = (prefix or [sys.executable, "-m", "latentr3_fast.train"]) + (TINY if tiny else [])
    cmd += list(args)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        cwd=str(cwd or REPO),
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def staged_run(tmp_path_factory) -> tuple[Path, dict[str, Result]]:
    """One output dir built stage by stage: sft, then grpo --resume, then eval --resume."""
    out = tmp_path_factory.mktemp("cli") / "run"
    results = {}
    for stage in ("sft", "grpo", "eval"):
        extra = [] if stage == "sft" else ["--resume"]
        res = run_cli(["--stage", stage, "--output-dir", str(out), *extra])
        results[stage] = res
        assert res.returncode == 0, f"--stage {stage}: {res.describe()}"
    return out, results

"""Crash safety: SIGKILL in the middle of SFT / GRPO / a checkpoint save, then resume.

* ``ckpt_stress.py`` kills a checkpoint-saving loop at random moments (and at injected points
  of the pruning and of the replace-rename) and loads every checkpoint left on disk.
* ``train_driver.py`` (trainers directly, checkpoint every step) and the CLI are SIGKILLed
  once a checkpoint appears; the resumed run must end with bit-identical parameters (fp32 CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import HERE, PYTHON, REPO, child_env, count
from safetensors.torch import load_file

STRESS = {"random": 8, "prune": 6, "replace": 2}


@pytest.fixture(scope="module")
def stress(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("stress")
    specs = [f"{m}:{k}" for m, k in STRESS.items()]
    r = subprocess.run(
        [PYTHON, str(HERE / "ckpt_stress.py"), str(out), "0", *specs],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {rep["mode"]: rep for rep in reports}


def test_random_kills_during_saves_leave_only_complete_checkpoints(stress):
    """8 SIGKILLs at random moments of a save loop: the newest listed checkpoint always loads
    and holds exactly its step's weights and optimizer state; the newest step never goes back.
    Older listed dirs are complete too (a kill while pruning leaves only a hidden
    ``.deleting`` dir), and a trainer start's ``recover_checkpoints`` leaves no hidden dir."""
    rep = stress["random"]
    count("faults:sigkill-during-save", rep["kills"])
    assert rep["kills"] == STRESS["random"]
    assert rep["problems"] == [] and rep["lost_progress"] == 0
    assert rep["partial_older"] == [], rep["partial_older"]
    assert rep["verified"] >= rep["kills"] and rep["newest_step"] >= rep["kills"]
    assert rep["leftover_dirs_after_recover"] == 0


def test_kill_during_pruning_leaves_no_listed_partial_checkpoint(stress):
    """Pruning renames step-N to .step-N.deleting-PID before removing it (was: rmtree in
    place, leaving step-N with trainer_state.json but no model files, still listed)."""
    rep = stress["prune"]
    count("faults:kill-during-prune", rep["kills"])
    assert rep["kills"] == STRESS["prune"]
    assert rep["problems"] == [] and rep["lost_progress"] == 0  # the newest is always fine
    assert rep["partial_older"] == [], rep["partial_older"][:3]
    assert rep["leftover_dirs_after_recover"] == 0


def test_kill_between_renames_keeps_the_checkpoint(stress):
    """A kill after ``step-N -> .step-N.old-PID`` and before ``tmp -> step-N``: listing
    renames the complete previous version back (was: step-N lost)."""
    rep = stress["replace"]
    count("faults:kill-between-renames", rep["kills"])
    assert rep["kills"] == STRESS["replace"]
    assert rep["lost_progress"] == 0 and rep["problems"] == [], rep["problems"]
    assert rep["verified"] == rep["kills"]  # step 0 found (and loaded) after every kill
    assert rep["leftover_dirs_after_recover"] == 0


def test_stale_temp_dirs_are_cleaned_by_the_next_save(tmp_path):
    count("faults:kill-during-write")
    code = (
        "import os, sys, torch\n"
        "from latentr3_fast.train.atomic import atomic_dir\n"
        "from latentr3_fast.train.checkpoint import save_checkpoint\n"
        "out = sys.argv[1]\n"
        "m = torch.nn.Linear(3, 2)\n"
        "if sys.argv[2] == 'die':\n"
        "    def write(d):\n"
        "        (d / 'half.bin').write_bytes(b'x' * 1000)\n"
        "        os._exit(137)\n"
        "    atomic_dir(os.path.join(out, 'checkpoints', 'step-00000001'), write)\n"
        "else:\n"
        "    save_checkpoint(out, 2, m)\n"
    )
    for arg in ("die", "save"):
        subprocess.run([PYTHON, "-c", code, str(tmp_path), arg], env=child_env(), timeout=120)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000002" in names and "step-00000001" not in names
    assert [n for n in names if n.startswith(".")] == [], names


# --------------------------------------------------------------------------- kill + resume
def _popen(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 (closed when the process is reaped)
    return subprocess.Popen(
        args, stdout=fh, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (polling); fail if it ends first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc={proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timeout waiting for {what}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _run(args: list[str], log: Path, timeout: float = 400) -> None:
    p = _popen(args, log)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert rc == 0, log.read_text(errors="replace")[-3000:]


def _steps(d: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in d.glob("checkpoints/step-*"))


def _assert_same(a: Path, b: Path) -> int:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a.name}: {k} differs after kill + resume"
    return len(sa)


@pytest.mark.slow
def test_sigkill_mid_sft_and_mid_grpo_then_resume_is_bit_identical(tmp_path):
    """Trainers with a checkpoint every step: kill in SFT, resume and kill in GRPO, resume to
    the end; SFT result and final parameters equal the uninterrupted run exactly."""
    driver = [PYTHON, str(HERE / "train_driver.py")]
    ref, run = tmp_path / "ref", tmp_path / "run"
    log = tmp_path / "log.txt"
    _run([*driver, str(ref)], log)

    p = _popen([*driver, str(run), "--step-delay", "0.4"], log)
    _kill_when(p, lambda: len(_steps(run / "sft")) >= 1, "an SFT checkpoint")
    count("faults:sigkill-mid-sft")
    assert not (run / "sft_final.safetensors").exists()
    assert max(_steps(run / "sft")) < 6  # it really died inside SFT

    p = _popen([*driver, str(run), "--resume", "--step-delay", "0.4"], log)
    _kill_when(p, lambda: len(_steps(run / "grpo")) >= 1, "a GRPO checkpoint")
    count("faults:sigkill-mid-grpo")
    assert not (run / "final.safetensors").exists()
    assert max(_steps(run / "grpo")) < 4

    _run([*driver, str(run), "--resume"], log)
    assert _assert_same(ref / "sft_final.safetensors", run / "sft_final.safetensors") > 10
    assert _assert_same(ref / "final.safetensors", run / "final.safetensors") > 10


CLI = [
    PYTHON,
    "-m",
    "latentr3_fast.train",
    "--synthetic-items",
    "60",
    "--synthetic-users",
    "60",
    "--tiny-hidden-size",
    "32",
    "--max-train-samples",
    "16",
    "--max-eval-samples",
    "8",
    "--num-beams",
    "2",
    "--max-steps",
    "3",
    "--baseline",
    "false",
    "--device",
    "cpu",
    "--sft-batch-size",
    "8",
    "--sft-micro-batch-size",
    "8",
    "--grpo-epochs",
    "3",
    "--num-generations",
    "4",
    "--seed",
    "3",
]


def _model_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


@pytest.mark.slow
def test_cli_sigkill_mid_sft_and_mid_grpo_then_resume_is_bit_identical(tmp_path):
    """``python -m latentr3_fast.train``: kill in SFT (after its first checkpoint) and in GRPO
    (after its first logged step), ``--resume`` each; saved stage models equal a clean run."""
    ref, run, log = tmp_path / "ref", tmp_path / "run", tmp_path / "log.txt"
    _run([*CLI, "--stage", "sft", "--output-dir", str(ref)], log)
    _run([*CLI, "--stage", "grpo", "--resume", "--output-dir", str(ref)], log)

    p = _popen([*CLI, "--stage", "sft", "--output-dir", str(run)], log)
    _kill_when(p, lambda: len(_steps(run / "sft")) >= 1, "an SFT checkpoint")
    count("faults:sigkill-mid-sft")
    assert not (run / "sft" / "model").exists()
    _run([*CLI, "--stage", "sft", "--resume", "--output-dir", str(run)], log)

    def grpo_logged() -> bool:
        f = run / "grpo" / "grpo_log.jsonl"
        return f.exists() and f.read_text().count("\n") >= 1

    p = _popen([*CLI, "--stage", "grpo", "--resume", "--output-dir", str(run)], log)
    _kill_when(p, grpo_logged, "a logged GRPO step")
    count("faults:sigkill-mid-grpo")
    assert not (run / "grpo" / "model").exists()
    _run([*CLI, "--stage", "grpo", "--resume", "--output-dir", str(run)], log)

    for stage in ("sft", "grpo"):
        files = _model_files(ref / stage / "model")
        assert files and [f.name for f in files] == [
            f.name for f in _model_files(run / stage / "model")
        ]
        for f in files:
            _assert_same(f, run / stage / "model" / f.name)

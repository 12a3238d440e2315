"""Recovery pieces of train/atomic.py and train/checkpoint.py on hand-built crash leftovers
(no real kills here; the SIGKILL runs are in test_rel_crash.py): restore of a renamed-aside
checkpoint, removal of dead writers' hidden dirs only, completeness check, log truncation on
resume, step in the non-finite stop message."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import PYTHON, count

from latentr3_fast.errors import TrainingError
from latentr3_fast.train import atomic
from latentr3_fast.train.atomic import atomic_dir
from latentr3_fast.train.checkpoint import (
    checkpoint_dirs,
    is_complete_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from latentr3_fast.train.logging_utils import JsonlLogger
from latentr3_fast.train.optim import NonFiniteGuard


def _dead() -> int:
    p = subprocess.Popen([PYTHON, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    return _dead()


@pytest.fixture
def live_pid():
    """The pid of another running process (killed afterwards)."""
    p = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _weights(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(float(step))
        m.bias.fill_(-float(step))
    return m


def _step_of(path: Path) -> float:
    m = torch.nn.Linear(3, 2)
    load_checkpoint(path, m, restore_rng=False)
    return float(m.weight[0, 0].detach())


def test_renamed_aside_checkpoint_is_restored_by_listing(tmp_path, dead_pid):
    """Killed between ``step-N -> .step-N.old-PID`` and ``tmp -> step-N``: the listing puts
    the complete previous version back; the dead writer's temp dir goes at the next save."""
    count("faults:hand-built-leftovers")
    save_checkpoint(tmp_path, 1, _weights(1), keep_last=0)
    save_checkpoint(tmp_path, 2, _weights(2), keep_last=0)
    root = tmp_path / "checkpoints"
    os.replace(root / "step-00000002", root / f".step-00000002.old-{dead_pid}")
    (root / f".step-00000002.tmp-{dead_pid}").mkdir()
    (root / f".step-00000002.tmp-{dead_pid}" / "half.bin").write_bytes(b"x" * 10)
    assert latest_checkpoint(tmp_path) == root / "step-00000002"
    assert _step_of(root / "step-00000002") == 2.0
    assert sorted(p.name for p in root.iterdir())[0] == f".step-00000002.tmp-{dead_pid}"
    save_checkpoint(tmp_path, 3, _weights(3), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]


def test_live_writers_dirs_are_left_alone(tmp_path, dead_pid, live_pid):
    """Hidden dirs of another live process may be a save in progress: untouched (also a
    missing NAME is not restored from a live writer's .old); dead ones are removed."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    live = [f".step-00000005.tmp-{live_pid}", f".step-00000004.old-{live_pid}"]
    dead = [f".step-00000005.tmp-{dead_pid}", f".step-00000001.deleting-{dead_pid}"]
    for name in live + dead:
        (root / name).mkdir()
        (root / name / "f").write_text("x")
    (root / ".unrelated-hidden").mkdir()
    assert checkpoint_dirs(tmp_path) == []  # nothing complete; the live .old not restored
    assert recover_checkpoints(tmp_path) == []
    assert sorted(p.name for p in root.iterdir()) == sorted([*live, ".unrelated-hidden"])


def test_surplus_old_copies_are_removed_and_newest_restored(tmp_path, dead_pid):
    save_checkpoint(tmp_path, 7, _weights(7), keep_last=0)
    root = tmp_path / "checkpoints"
    final = root / "step-00000007"
    os.replace(final, root / f".step-00000007.old-{dead_pid}")
    stale = root / f".step-00000007.old-{_dead()}"
    stale.mkdir()
    os.utime(stale, (1, 1))  # older than the real copy: not the one restored
    assert [p.name for p in recover_checkpoints(tmp_path)] == ["step-00000007"]
    assert _step_of(final) == 7.0
    assert sorted(p.name for p in root.iterdir()) == ["step-00000007"]


def test_atomic_dir_failing_second_rename_keeps_old_version(tmp_path, monkeypatch):
    final = tmp_path / "best"
    atomic_dir(final, lambda d: (d / "a.txt").write_text("v1"))
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((Path(a).name, Path(b).name))
        if len(calls) == 2:
            raise OSError("disk full")
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        atomic_dir(final, lambda d: (d / "a.txt").write_text("v2"))
    monkeypatch.setattr(atomic.os, "replace", real)
    assert calls[0] == ("best", f".best.old-{os.getpid()}")
    assert (final / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_damaged_checkpoint_is_not_listed_and_does_not_load(tmp_path):
    """A checkpoint whose files no longer match its completion marker (truncated / removed
    in place) is skipped by the listing and refused by load_checkpoint."""
    for s in (1, 2):
        save_checkpoint(tmp_path, s, _weights(s), keep_last=0)
    d2 = tmp_path / "checkpoints" / "step-00000002"
    marker = json.loads((d2 / "checkpoint_complete.json").read_text())
    assert marker["step"] == 2 and "model/model.safetensors" in marker["files"]
    assert marker["files"]["trainer_state.json"] == (d2 / "trainer_state.json").stat().st_size
    st = d2 / "trainer_state.json"  # edited by hand: still complete
    st.write_text(st.read_text().replace('"step": 2', '"step": 2, "note": "hand edit"'))
    assert "hand edit" in st.read_text()
    assert is_complete_checkpoint(d2)
    w = d2 / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1])
    assert not is_complete_checkpoint(d2)
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001"]
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        load_checkpoint(d2, torch.nn.Linear(3, 2))
    (d2 / "model" / "model.safetensors").unlink()
    (d2 / "checkpoint_complete.json").unlink()  # no marker: the legacy rule needs weights
    assert not is_complete_checkpoint(d2)


def test_jsonl_logger_resume_drops_records_after_the_checkpoint(tmp_path):
    """Steps 1-5 logged, an event after step 5 and a line torn by the kill; the checkpoint
    was step 3: reopening with resume_step=3 keeps exactly what precedes it."""
    count("faults:torn-log-line")
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path) as log:
        log.log({"event": "start"})
        for s in range(1, 6):
            log.log({"loss": float(s)}, step=s)
            if s == 3:
                log.log({"event": "eval", "val_loss": 0.5}, step=3)
        log.log({"event": "after"})
    with path.open("a") as f:
        f.write('{"time": 1.0, "step": 6, "lo')
    with JsonlLogger(path, resume_step=3) as log:
        log.log({"loss": 4.5}, step=4)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r.get("step"), r.get("event")) for r in recs] == [
        (None, "start"),
        (1, None),
        (2, None),
        (3, None),
        (3, "eval"),
        (4, None),
    ]
    assert recs[-1]["loss"] == 4.5
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # no temp file left


def test_jsonl_logger_resume_removes_a_dead_rewriters_temp_file(tmp_path, dead_pid, live_pid):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / f".log.jsonl.tmp-{dead_pid}").write_text('{"step": 1}\n')
    (tmp_path / f".log.jsonl.tmp-{live_pid}").write_text("")
    JsonlLogger(path, resume_step=1).close()
    assert path.read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".log.jsonl.tmp-{live_pid}", "log.jsonl"]


def test_jsonl_logger_default_append_unchanged_but_never_glues_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path) as log:
        log.log({"a": 1}, step=5)
    with JsonlLogger(path) as log:  # default: plain append, nothing dropped
        log.log({"a": 2}, step=1)
    with path.open("a") as f:
        f.write('{"torn')
    with JsonlLogger(path) as log:
        log.log({"a": 3}, step=2)
    lines = path.read_text().splitlines()
    assert [json.loads(x)["a"] for x in lines[:2]] == [1, 2]
    assert lines[2] == '{"torn' and json.loads(lines[3])["a"] == 3
    with JsonlLogger(tmp_path / "new.jsonl", resume_step=0) as log:  # missing file: fine
        log.log({"a": 4}, step=1)
    assert json.loads((tmp_path / "new.jsonl").read_text())["step"] == 1


def test_nonfinite_guard_names_step_and_last_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 4, _weights(4), keep_last=0)
    g = NonFiniteGuard(max_bad_steps=2, where="SFT", output_dir=tmp_path)
    assert g.ok(torch.tensor(1.0), step=4)
    assert not g.ok(torch.tensor(float("nan")), step=5)
    with pytest.raises(TrainingError) as e:
        g.ok(float("inf"), torch.tensor(2.0), step=6)
    msg = str(e.value)
    assert "SFT: 2 consecutive" in msg and "at step 6 (non-finite since step 5)" in msg
    assert str(tmp_path / "checkpoints" / "step-00000004") in msg
    g2 = NonFiniteGuard(max_bad_steps=1)  # old call form: no step, no directory
    with pytest.raises(TrainingError, match=r"1 consecutive .*max_bad_steps=1\); stopping"):
        g2.ok(float("nan"))

"""Ctrl-C / SIGTERM handling (issue 16): the first signal inside a training loop is deferred to
the next step boundary, where the trainer checkpoints and raises TrainingInterrupted; a second
signal, or one outside a loop, interrupts at once. GRPO resumes from that checkpoint to the
parameters of an uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest
from grpo_helpers import RESUME_RUN, assert_resume_matches, resume_setup

from latentr3_fast.train import grpo as grpo_mod
from latentr3_fast.train import interrupt
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
from latentr3_fast.train.interrupt import TrainingInterrupted


@pytest.fixture
def handlers():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupt.install_handlers()
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_first_signal_is_deferred_second_is_immediate(handlers, capsys):
    with pytest.raises(KeyboardInterrupt):  # outside a training loop: at once
        os.kill(os.getpid(), signal.SIGTERM)
    with interrupt.deferred_interrupts():
        assert not interrupt.interrupt_requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.interrupt_requested()  # no exception: the step in flight goes on
        assert "SIGINT: finishing this training step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user insists
        interrupt.honour_interrupt()
    assert not interrupt.interrupt_requested()  # reset when the loop ends
    # a request nobody polled is honoured when the block ends
    with pytest.raises(KeyboardInterrupt), interrupt.deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)


def test_grpo_checkpoints_on_interrupt_and_resumes_exactly(tmp_path, monkeypatch):
    samples, model, ref_model = resume_setup()
    tr = GRPOTrainer(
        model, GRPOConfig(output_dir=str(tmp_path), max_steps=4, **RESUME_RUN), samples
    )
    # a signal arrives during step 2 (no save_steps: nothing would be saved before the end)
    monkeypatch.setattr(grpo_mod, "interrupt_requested", lambda: tr.global_step >= 2)
    with pytest.raises(TrainingInterrupted) as exc:
        tr.train()
    assert str(exc.value) == (
        f"GRPO interrupted after step 2: checkpoint saved in {tmp_path} (--resume continues "
        "from it)"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.setattr(grpo_mod, "interrupt_requested", lambda: False)
    assert_resume_matches(tmp_path, samples, ref_model)

"""train/optim, atomic, checkpoint, logging_utils, rng: schedules, optimizer choice, atomic
directories, guard, logger, RNG."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from latentr3_fast.errors import ConfigError, TrainingError
from latentr3_fast.train.atomic import atomic_dir
from latentr3_fast.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from latentr3_fast.train.logging_utils import JsonlLogger
from latentr3_fast.train.optim import NonFiniteGuard, build_optimizer, build_scheduler, lr_lambda
from latentr3_fast.train.rng import get_rng_state, set_rng_state


def test_linear_and_cosine_schedules_hand_values():
    lin = lr_lambda(4, 14, "linear")
    assert [lin(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lin(9) == pytest.approx(0.5) and lin(14) == 0.0 and lin(20) == 0.0
    cos = lr_lambda(2, 12, "cosine")
    assert cos(1) == 0.5 and cos(2) == 1.0
    assert cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0, abs=1e-12)
    assert cos(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_lambda(0, 10, "constant")(7) == 1.0
    floor = lr_lambda(0, 10, "linear", min_lr_ratio=0.1)
    assert floor(10) == pytest.approx(0.1) and floor(5) == pytest.approx(0.55)
    with pytest.raises(ConfigError):
        lr_lambda(0, 10, "step")


def test_scheduler_drives_optimizer_lr():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = build_optimizer([w], lr=0.1)
    sched = build_scheduler(opt, "linear", warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.075, 0.05, 0.025])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_adamw_8bit_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="adamw_8bit"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], optim="adamw_8bit")
    with pytest.raises(ConfigError, match="optim"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], optim="sgd")


def test_adamw_8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    """bitsandbytes is the optional [bnb] extra: asking for the 8-bit optimizer without it is
    a one-line error naming the extra, from the trainer and from the CLI config alike."""
    import importlib.util

    from latentr3_fast.train.config import RunConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k),
    )
    with pytest.raises(ConfigError, match=r"pip install 'latentr3_fast\[bnb\]'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], optim="adamw_8bit")
    with pytest.raises(ConfigError, match=r"--optim adamw_8bit needs bitsandbytes.*\[bnb\]"):
        RunConfig(optim="adamw_8bit").validate()
    RunConfig(optim="adamw").validate()  # the default never looks for it
    build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], optim="adamw")


def test_bitsandbytes_is_imported_only_for_adamw_8bit():
    """A fresh interpreter that imports the package, builds the CLI config and a default
    optimizer never imports bitsandbytes."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        "import latentr3_fast, latentr3_fast.train, latentr3_fast.reward\n"
        "from latentr3_fast.train.optim import build_optimizer\n"
        "from latentr3_fast.train.config import RunConfig\n"
        "RunConfig().validate()\n"
        "build_optimizer([torch.nn.Parameter(torch.zeros(2))], optim='adamw')\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_declared_dependencies_match_the_code():
    """pyproject: transformers floor at 4.56 (the first release with Cache.layers,
    DynamicCache(config=) and from_pretrained(dtype=), all used by the model code; checked by
    installing 4.56.0 and 4.55.4, see README), bitsandbytes only in the [bnb] extra."""
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    assert "transformers>=4.56" in deps
    assert not any(d.startswith("bitsandbytes") for d in deps)
    assert any(
        d.startswith("bitsandbytes") for d in meta["project"]["optional-dependencies"]["bnb"]
    )


def test_atomic_dir_keeps_old_version_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    atomic_dir(final, lambda d: (d / "a.txt").write_text("v1"))
    assert (final / "a.txt").read_text() == "v1"

    def broken(d):
        (d / "a.txt").write_text("v2-partial")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(final, broken)
    assert (final / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp debris
    atomic_dir(final, lambda d: (d / "b.txt").write_text("v3"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_checkpoint_round_trip_and_rotation(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1)
    sched = build_scheduler(opt, "linear", 1, 10)
    for step in range(1, 4):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        save_checkpoint(tmp_path, step, model, opt, sched, {"pos": step * 7}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    want_rng = get_rng_state()
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(want_rng)
    save_checkpoint(tmp_path, 4, model, opt, sched, {"pos": 99}, keep_last=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    m2 = torch.nn.Linear(3, 2)
    o2 = build_optimizer(m2, lr=0.1)
    s2 = build_scheduler(o2, "linear", 1, 10)
    torch.manual_seed(123)
    state = load_checkpoint(latest_checkpoint(tmp_path), m2, o2, s2)
    assert state["pos"] == 99 and state["step"] == 4
    for k, v in m2.state_dict().items():
        assert torch.equal(v, weights[k])
    assert s2.last_epoch == sched.last_epoch
    assert o2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    got = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert got == expect


def test_nonfinite_guard_counts_consecutive():
    g = NonFiniteGuard(max_bad_steps=2)
    assert g.ok(torch.tensor(1.0), 2.0)
    assert not g.ok(torch.tensor(float("nan")))
    assert g.ok(torch.tensor(0.5))  # a good step resets the run
    assert not g.ok(float("inf"))
    with pytest.raises(TrainingError, match="2 consecutive"):
        g.ok(torch.tensor([1.0, float("nan")]))
    assert g.total == 3


def test_jsonl_logger(tmp_path):
    with JsonlLogger(tmp_path / "log" / "x.jsonl") as log:
        log.log({"loss": torch.tensor(1.5), "lr": 0.1}, step=3)
        log.log({"event": "eval"})
    lines = [json.loads(x) for x in (tmp_path / "log" / "x.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == 1.5 and lines[0]["step"] == 3 and lines[1]["event"] == "eval"
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard"):
            JsonlLogger(None, tensorboard_dir=tmp_path / "tb")

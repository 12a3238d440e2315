"""SIGKILL during checkpoint saves, many times, in one process tree (fork: imports paid once).

    python ckpt_stress.py OUT SEED MODE:KILLS [MODE:KILLS ...]

MODE ``random`` (default): a forked child saves checkpoints of a tiny LatentReasoner in a loop
(step s holds parameters ``base + s``, so each checkpoint's content is checkable); the parent
SIGKILLs it after a random delay, then loads EVERY checkpoint ``checkpoint_dirs`` lists into a
fresh model/optimizer/scheduler and checks weights, optimizer state and step agree. Repeats.

MODE ``prune``: the child dies (``os._exit``) after the k-th unlink of ``keep_last`` pruning
(``shutil.rmtree`` of the oldest checkpoint), for every k: a kill at each point of the removal.

MODE ``replace``: the child dies between the two renames of ``atomic_dir`` when the target
exists (re-saving the same step): is the checkpoint still found afterwards?

Prints one JSON line per mode (each in OUT/MODE): kills, checkpoints verified, problems
(listed but broken checkpoints, lost progress), hidden leftovers (``.step-*.tmp-*`` /
``.old-*`` / ``.deleting-*`` dirs and their bytes) after the last kill, and how many remain
after ``recover_checkpoints`` (what a trainer start does).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_flush_denormal(True)
torch.set_num_threads(1)


def build():
    from reliability_tiny import tiny_model

    from latentr3_fast.data import train_tokenizer
    from latentr3_fast.train.optim import build_optimizer, build_scheduler

    tok = train_tokenizer(['"a b c"\n', "hello world"] * 3, vocab_size=280)
    model = tiny_model(tok, num_heads=4, num_kv_heads=2)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    sched = build_scheduler(opt, "linear", 2, 100)
    return model, opt, sched


def set_step(model, opt, base, s: int) -> None:
    """Parameters = base + s; optimizer state = one step whose exp_avg marks s."""
    with torch.no_grad():
        for (_, p), b in zip(model.named_parameters(), base):
            p.copy_(b + s)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            st["step"] = torch.tensor(float(s))
            st["exp_avg"] = torch.full_like(p, float(s))
            st["exp_avg_sq"] = torch.full_like(p, 1.0)


def verify(out: Path, base) -> tuple[int, list[str], int, list[str]]:
    """Load every listed checkpoint; returns (verified, problems of the newest one, newest
    verified step, problems of older ones -- the partial leftovers of an interrupted prune)."""
    from latentr3_fast.train.checkpoint import checkpoint_dirs, load_checkpoint

    problems, ok, newest = [], 0, -1
    dirs = checkpoint_dirs(out)
    older: list[str] = []
    for j, d in enumerate(dirs):
        sink = problems if j == len(dirs) - 1 else older
        s = int(d.name.split("-")[1])
        model, opt, sched = build()
        try:
            state = load_checkpoint(d, model, opt, sched, restore_rng=True)
        except Exception as e:  # any failure to load a LISTED checkpoint is a problem
            sink.append(f"{d.name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        good = state["step"] == s and state.get("marker") == s
        for (_, p), b in zip(model.named_parameters(), base):
            good &= bool(torch.equal(p.detach(), b + s))
        for group in opt.param_groups:
            for p in group["params"]:
                good &= float(opt.state[p]["exp_avg"].flatten()[0]) == float(s)
        if good:
            ok += 1
            newest = max(newest, s)
        else:
            sink.append(f"{d.name}: content does not match step {s}")
    return ok, problems, newest, older


def leftovers(out: Path) -> tuple[int, int]:
    root = out / "checkpoints"
    n, size = 0, 0
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                n += 1
                size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return n, size


def child_loop(out: Path, model, opt, sched, base, start: int, mode: str, k: int) -> None:
    from latentr3_fast.train import checkpoint

    if mode == "prune":
        real_unlink = os.unlink
        calls = [0]

        def unlink(*a, **kw):
            real_unlink(*a, **kw)
            calls[0] += 1
            if calls[0] >= k:
                os._exit(137)  # killed after the k-th file of the pruned checkpoint

        # only the pruning rmtree dies; the save itself runs normally. Pruning removes a
        # checkpoint in place (step-N) or after renaming it to .step-N.deleting-<own pid>.
        real_rmtree = checkpoint.shutil.rmtree

        def pruning(path) -> bool:
            name = Path(path).name
            own = name.startswith(".step-") and name.endswith(f".deleting-{os.getpid()}")
            return name.startswith("step-") or own

        def rmtree(path, *a, **kw):
            if pruning(path):
                calls[0] = 0
                os.unlink = unlink
            try:
                real_rmtree(path, *a, **kw)
            finally:
                os.unlink = real_unlink
            if pruning(path):
                os._exit(137)  # k beyond the file count: die right after the removal

        checkpoint.shutil.rmtree = rmtree
    if mode == "replace":
        real_replace = os.replace
        calls = [0]

        def replace(a, b):
            calls[0] += 1
            if calls[0] == 2:
                os._exit(137)  # after final -> .old, before tmp -> final
            real_replace(a, b)

        checkpoint.os.replace = replace
    s = start
    while True:
        set_step(model, opt, base, s)
        checkpoint.save_checkpoint(out, s, model, opt, sched, {"marker": s}, keep_last=2)
        if mode != "replace":  # replace: re-save the same step until the injected death
            s += 1


def run_mode(out: Path, mode: str, kills: int, rng: random.Random) -> dict:
    from latentr3_fast.train.checkpoint import recover_checkpoints, save_checkpoint

    model, opt, sched = build()
    base = [p.detach().clone() for p in model.parameters()]
    report = {
        "mode": mode,
        "kills": 0,
        "verified": 0,
        "problems": [],
        "lost_progress": 0,
        "partial_older": [],
    }
    # one clean save first, so "never lose progress" has a baseline
    set_step(model, opt, base, 0)
    save_checkpoint(out, 0, model, opt, sched, {"marker": 0}, keep_last=2)
    newest = 0
    for i in range(kills):
        start = newest + 1 if mode != "replace" else newest
        pid = os.fork()
        if pid == 0:
            try:
                child_loop(out, model, opt, sched, base, start, mode, i + 1)
            finally:
                os._exit(1)
        if mode == "random":
            time.sleep(rng.uniform(0.02, 0.5))
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["kills"] += 1
        ok, problems, now, older = verify(out, base)
        report["verified"] += ok
        report["problems"] += [f"kill {i}: {p}" for p in problems]
        report["partial_older"] += [f"kill {i}: {p}" for p in older]
        if now < newest:
            report["lost_progress"] += 1
            report["problems"].append(f"kill {i}: newest checkpoint went back {newest} -> {now}")
        newest = max(newest, now)
    report["newest_step"] = newest
    report["leftover_dirs"], report["leftover_bytes"] = leftovers(out)
    # what the next trainer start does: restore / remove the dead writers' hidden dirs
    recover_checkpoints(out)
    report["leftover_dirs_after_recover"] = leftovers(out)[0]
    return report


def main() -> None:
    out, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    for spec in sys.argv[3:]:
        mode, _, kills = spec.partition(":")
        print(json.dumps(run_mode(out / mode, mode, int(kills), rng)), flush=True)


if __name__ == "__main__":
    main()

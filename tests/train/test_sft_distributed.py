"""SFT under torch.distributed (2 gloo processes on CPU).

* Two ranks, each training on its share of every global step, reach the same parameters and
  validation losses as one process with the same global batch -- including a run interrupted
  mid-epoch and resumed from the checkpoint on every rank.
* A rank that dies (crash) or stalls (hang: caught by the process-group timeout) makes the
  other stop with a TrainingError naming the rank and the step, instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer
from latentr3_fast.errors import TrainingError
from latentr3_fast.model import tiny_qwen2
from latentr3_fast.train.sft import SFTConfig, SFTTrainer, rank_share

# 37 train rows in global steps of 16 (2 micro-batches of 8): per epoch 16, 16, 5 samples, so
# the last step splits 3/2 across 2 ranks; 20 validation rows in batches of 8 -> 2 + 1 batches.
N_TRAIN, N_VALID = 37, 20
DIST_TIMEOUT_S = 10


class _Interrupt(Exception):
    pass


def _data():
    ds = make_synthetic(num_items=40, num_users=60, seed=0)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=400)
    pb = PromptBuilder(tok, ds.category, num_latent=1, max_length=96)
    return tok, pb.encode_many(ds.train[:N_TRAIN]), pb.encode_many(ds.valid[:N_VALID])


def _model(tok):
    return tiny_qwen2(tok, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate=64, seed=3)


def _cfg(out, **kw) -> SFTConfig:
    base = dict(
        output_dir=out,
        epochs=2,
        batch_size=8,
        grad_accum=2,
        eval_batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        max_grad_norm=0.5,  # clipping active: the GLOBAL norm must be used on every rank
        patience=5,
        save_steps=1,
        logging_steps=1,
        progress=False,
        seed=5,
    )
    base.update(kw)
    return SFTConfig(**base)


def _train(data, out, stop_at: int | None = None, resume: bool = False, steps=None):
    """Train (optionally raising after step ``stop_at``); returns (params, val losses).
    ``steps`` collects ``step -> (loss, pre-clip grad norm)`` (scale-sensitive, unlike Adam)."""
    tok, train, valid = data
    model = _model(tok)
    steps = {} if steps is None else steps

    def stop(trainer, rec):
        steps[trainer.global_step] = (rec["loss"], rec["grad_norm"])
        if stop_at is not None and trainer.global_step == stop_at:
            raise _Interrupt

    trainer = SFTTrainer(model, _cfg(out, resume=resume), train, valid, callbacks=[stop])
    trainer.train()
    vals = [h["val_loss"] for h in trainer.history if "val_loss" in h]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, vals, steps


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _equal_worker(rank, world, port, data, out, result_path, sys_path):
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    _init(rank, world, port, 60)
    try:
        steps: dict[int, tuple[float, float]] = {}
        try:  # killed mid-epoch 1 (after the checkpoint of step 2) ...
            _train(data, out, stop_at=3, steps=steps)
            raise AssertionError("the callback did not interrupt")
        except _Interrupt:
            pass
        dist.barrier()
        params, vals, steps = _train(data, out, resume=True, steps=steps)  # ... resumed
        torch.save({"params": params, "vals": vals, "steps": steps}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_share_partitions_contiguously():
    idx = [7, 3, 9, 1, 4]
    for world in (1, 2, 3, 7):
        shares = [rank_share(idx, world, r) for r in range(world)]
        assert [i for s in shares for i in s] == idx
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert rank_share(idx, 2, 0) == [7, 3, 9] and rank_share(idx, 2, 1) == [1, 4]


def test_two_gloo_ranks_equal_one_process_with_resume(tmp_path):
    data = _data()
    single, single_vals, single_steps = _train(data, str(tmp_path / "single"))
    assert sorted(single_steps) == [1, 2, 3, 4, 5, 6]
    start = _model(data[0]).state_dict()
    moved = sum(float((single[k] - start[k]).abs().sum()) for k in single)
    assert moved > 0
    assert len(single_vals) == 2  # one validation per epoch

    path = str(tmp_path / "rank")
    out = str(tmp_path / "ddp")
    mp.spawn(
        _equal_worker,
        args=(2, _free_port(), data, out, path, list(sys.path)),
        nprocs=2,
        join=True,
    )
    for r in range(2):
        res = torch.load(f"{path}.{r}")
        for k, v in single.items():
            torch.testing.assert_close(res["params"][k], v, atol=1e-5, rtol=1e-5, msg=f"{k} r{r}")
        # the resumed run's history came from the checkpoint: both validations are there
        assert res["vals"] == pytest.approx(single_vals, rel=1e-6), r
        # loss and pre-clip gradient norm of every global step (step 3 ran twice: the
        # interrupted run and the resumed one; the resumed value is kept)
        assert sorted(res["steps"]) == sorted(single_steps)
        for step, (loss, norm) in single_steps.items():
            assert res["steps"][step] == pytest.approx((loss, norm), rel=1e-5), (step, r)
    # rank 0 alone wrote the checkpoints, the log and the best copy
    assert (tmp_path / "ddp" / "best").is_dir()
    assert (tmp_path / "ddp" / "sft_log.jsonl").is_file()


def _death_worker(rank, world, port, data, msg_path, mode, sys_path):
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    _init(rank, world, port, DIST_TIMEOUT_S)
    tok, train, valid = data

    def die(trainer, rec):
        if rank == 1 and trainer.global_step == 1:
            if mode == "hang":  # alive but stuck: only the process-group timeout can tell
                time.sleep(10 * DIST_TIMEOUT_S)
            os._exit(7)  # a crash: no cleanup, no goodbye to the peers

    trainer = SFTTrainer(_model(tok), _cfg(None, save_steps=None), train, valid, callbacks=[die])
    try:
        trainer.train()
    except TrainingError as exc:
        with open(msg_path, "w") as f:
            f.write(str(exc))
        os._exit(3)
    os._exit(0)


@pytest.mark.parametrize("mode", ["crash", pytest.param("hang", marks=pytest.mark.slow)])
def test_dead_rank_makes_the_other_fail_clearly(tmp_path, mode):
    data = _data()
    ctx = mp.get_context("spawn")
    port, msg = _free_port(), str(tmp_path / "msg")
    procs = [
        ctx.Process(target=_death_worker, args=(r, 2, port, data, msg, mode, list(sys.path)))
        for r in range(2)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    procs[0].join(timeout=90)
    alive0 = procs[0].is_alive()
    if mode == "hang":
        procs[1].kill()  # the stuck rank is the launcher's to kill (torchrun does this)
    procs[1].join(timeout=30)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive0, "rank 0 hung after its peer died"
    assert procs[1].exitcode == (7 if mode == "crash" else -9)
    assert procs[0].exitcode == 3, procs[0].exitcode
    with open(msg) as f:
        text = f.read()
    assert "SFT rank 0/2" in text and "another rank probably died" in text, text
    assert "step 2" in text, text
    assert time.monotonic() - t0 < 90

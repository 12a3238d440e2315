"""Batch-mode advantages across ranks: 2 gloo processes, each holding half of every advantage
batch, must produce the same rewards, advantages, LatentRATT gradients and updated weights as
one process holding the whole step."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer, local_prompt_positions

G = 3
P = 8
A = 4  # two advantage batches of 4 prompts; each rank holds 2 prompts of each
# one prompt per forward: padding is then identical in both layouts, so the rewards agree
# bitwise (batch composition changes the padded length and, at |s| ~ 400 for an untrained
# model, fp32 rounding of the rewards would dominate the comparison; micro-batching itself is
# covered by test_grpo_equivalence)
MICRO = 1


def _cfg(micro: int) -> GRPOConfig:
    return GRPOConfig(
        num_generations=G,
        prompts_per_step=P,
        advantage_batch=A,
        micro_batch_prompts=micro,
        lr=1e-2,
        warmup_steps=0,
        max_grad_norm=0.05,  # the clip is active: the GLOBAL norm must be used on every rank
        progress=False,
        seed=11,
        eval_batch_size=2,
    )


def _run(world: int, rank: int, micro: int) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same GEMM summation order in every process
    try:
        return _run_inner(micro)
    finally:
        torch.set_num_threads(threads)


def _run_inner(micro: int) -> dict[str, torch.Tensor]:
    from grpo_helpers import tiny_setup, varied_samples

    torch.set_flush_denormal(True)
    ds, tok, builder, model = tiny_setup(hidden=32)
    samples = varied_samples(ds, builder, 16)
    # 5 validation rows in batches of 2: rank 0 scores 2 batches, rank 1 one
    tr = GRPOTrainer(model, _cfg(micro), samples, valid_data=samples[11:16])
    out = tr.compute_gradients(0)
    res = {"rewards": out["rewards"], "adv": out["advantages"]}
    res.update({f"grad.{n}": p.grad.clone() for n, p in model.ratt.named_parameters()})
    res["val0"] = _val(tr)
    mets = tr.train_rollout(0)  # a full optimizer step (all-reduce + global clip + AdamW)
    res["val1"] = _val(tr)
    res.update({f"param.{n}": p.detach().clone() for n, p in model.ratt.named_parameters()})
    res["grad_norm"] = torch.tensor(mets[0]["grad_norm"])
    res["reward_clean_mean"] = torch.tensor(mets[0]["reward_clean_mean"])
    return res


def _val(tr) -> torch.Tensor:
    v = tr.validate()
    return torch.tensor([v["reward"], v["nll"], v["rows"]], dtype=torch.float64)


def _worker(rank: int, world: int, port: int, path: str, sys_path: list[str]) -> None:
    import sys

    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run(world, rank, micro=MICRO), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    import sys

    single = _run(1, 0, micro=MICRO)
    path = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), path, list(sys.path)), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]

    # rank r holds positions local_prompt_positions(P, A, 2, r) of the global step
    order = [local_prompt_positions(P, A, 2, r) for r in range(2)]
    for key in ("rewards", "adv"):
        glob = torch.empty(P * G)
        for r in range(2):
            for j, pos in enumerate(order[r]):
                glob[pos * G : (pos + 1) * G] = ranks[r][key][j * G : (j + 1) * G]
        torch.testing.assert_close(glob, single[key], atol=1e-6, rtol=1e-6, msg=key)
    assert single["adv"].abs().sum() > 0
    for key in single:
        if key.startswith(("grad.", "param.", "val")) or key in ("grad_norm", "reward_clean_mean"):
            for r in range(2):
                torch.testing.assert_close(
                    ranks[r][key], single[key], atol=1e-6, rtol=1e-5, msg=f"{key} rank {r}"
                )
    # validation: every rank gets the same values bit for bit (same keep/stop decision)
    for key in ("val0", "val1"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert ranks[0][key][2] == 5


def _interrupt_worker(rank: int, world: int, port: int, out: str, sys_path: list[str]) -> None:
    """Rank 1 alone gets the signal (during step 1); record how each rank's train() ends."""
    import datetime
    import sys

    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    timeout = datetime.timedelta(seconds=30)  # without agreement rank 0 would wait here
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        from grpo_helpers import RESUME_RUN, tiny_setup, varied_samples

        from latentr3_fast.train import grpo as grpo_mod
        from latentr3_fast.train.interrupt import TrainingInterrupted

        torch.set_num_threads(1)
        ds, _, builder, model = tiny_setup(hidden=32)
        run = dict(RESUME_RUN, prompts_per_step=4)  # 2 prompts per rank
        tr = GRPOTrainer(
            model,
            GRPOConfig(output_dir=out, max_steps=4, **run),
            varied_samples(ds, builder, 12),
        )
        grpo_mod.interrupt_requested = lambda: rank == 1 and tr.global_step >= 1
        try:
            tr.train()
            ending = "finished"
        except TrainingInterrupted as exc:
            ending = str(exc)
        except Exception as exc:  # a failed collective: the ranks disagreed
            ending = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/ending.{rank}", "w") as f:
            f.write(ending)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_interrupt_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A signal that reaches one rank only (a per-node SIGTERM): both ranks stop after the same
    step and rank 0 writes the checkpoint, instead of the others running into a dead peer."""
    import sys

    args = (2, _free_port(), str(tmp_path), list(sys.path))
    mp.spawn(_interrupt_worker, args=args, nprocs=2, join=True)
    endings = [(tmp_path / f"ending.{r}").read_text() for r in range(2)]
    expected = (
        f"GRPO interrupted after step 1: checkpoint saved in {tmp_path} (--resume continues "
        "from it)"
    )
    assert endings == [expected, expected]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]

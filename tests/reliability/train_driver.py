"""Subprocess driver of the crash tests: SFT then GRPO on a tiny model, checkpointing every step.

    python train_driver.py OUT [--resume] [--step-delay S] [--sft-steps N] [--grpo-steps N]

Writes ``OUT/sft_final.safetensors`` (model after SFT, best weights reloaded) and
``OUT/final.safetensors`` (after GRPO), then prints ``DONE``. ``--step-delay`` sleeps after
every optimizer step so that a test can SIGKILL the process in the middle of a stage.
Everything is fp32 on CPU and seeded, so an interrupted + resumed run must end with exactly
the parameters of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

torch.set_flush_denormal(True)
torch.set_num_threads(1)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--sft-steps", type=int, default=6)
    ap.add_argument("--grpo-steps", type=int, default=4)
    args = ap.parse_args()

    from reliability_tiny import tiny_data, tiny_model
    from safetensors.torch import save_file

    from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
    from latentr3_fast.train.sft import SFTConfig, SFTTrainer

    out = Path(args.out)
    tok, train, valid = tiny_data(seed=0, n_train=32, n_valid=8, max_length=64)
    model = tiny_model(tok, num_heads=4, num_kv_heads=2)
    delay = args.step_delay

    sft_cfg = SFTConfig(
        output_dir=str(out / "sft"),
        epochs=2,
        batch_size=4,
        grad_accum=2,
        eval_batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        save_steps=1,
        keep_checkpoints=2,
        eval_steps=3,
        max_steps=args.sft_steps,
        seed=0,
        progress=False,
        resume=args.resume,
        logging_steps=1,
        patience=5,
    )
    sft = SFTTrainer(
        model, sft_cfg, train, valid, callbacks=[lambda tr, rec: time.sleep(delay)] if delay else ()
    )
    sft.train()
    save_file(_state(model), str(out / "sft_final.safetensors"))

    grpo_cfg = GRPOConfig(
        output_dir=str(out / "grpo"),
        num_generations=4,
        sigma=1.0,
        prompts_per_step=4,
        micro_batch_prompts=2,
        lr=1e-3,
        warmup_steps=1,
        max_steps=args.grpo_steps,
        save_steps=1,
        keep_checkpoints=2,
        seed=0,
        progress=False,
        resume=args.resume,
        logging_steps=1,
        save_final_model=False,
    )
    grpo = GRPOTrainer(model, grpo_cfg, train)
    if delay:
        rollout = grpo.train_rollout

        def slow(*a, **k):
            res = rollout(*a, **k)
            time.sleep(delay)
            return res

        grpo.train_rollout = slow
    grpo.train()
    save_file(_state(model), str(out / "final.safetensors"))
    print("DONE", flush=True)


if __name__ == "__main__":
    main()

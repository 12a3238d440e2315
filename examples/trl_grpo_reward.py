"""TRL GRPOTrainer with the reference-answer perplexity reward (runs on CPU in well under 1 min).

The policy writes a short "reasoning" completion; the reward is minus the perplexity of the
dataset's ground-truth answer after prompt + completion, scored by the policy itself through
``latentr3_fast.reward.make_trl_reward`` (fused LM head, shared prompt KV cache, no decoding of
the answer, no verifier).

    pip install ".[trl]"    # trl and datasets
    python examples/trl_grpo_reward.py [--steps 2] [--conversational]

Swap the tiny model for a real one (``AutoModelForCausalLM.from_pretrained(...)`` and its
tokenizer) and raise the lengths for real use.
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def tiny_model_and_tokenizer(texts: list[str]):
    """A 2-layer Qwen2 on a byte-level BPE trained on ``texts`` (a fraction of a second)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from latentr3_fast.data import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config), tokenizer


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from latentr3_fast.reward import make_trl_reward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--conversational", action="store_true", help="chat-format prompts")
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)

    histories = [
        ("Abbey Road, Let It Be", "Revolver"),
        ("Kind of Blue, Blue Train", "A Love Supreme"),
        ("Thriller, Bad", "Dangerous"),
        ("Nevermind, In Utero", "Bleach"),
    ]
    texts = [f"The user listened to {h}. Next album:" for h, _ in histories]
    model, tokenizer = tiny_model_and_tokenizer(texts + [f' "{t}"' for _, t in histories] * 4)
    if args.conversational:
        # A minimal ChatML-like template so TRL can render the conversation for generation.
        tokenizer.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
        prompts = [[{"role": "user", "content": t}] for t in texts]
    else:
        prompts = texts
    dataset = Dataset.from_dict({"prompt": prompts, "target": [f' "{t}"' for _, t in histories]})

    reward = make_trl_reward(
        model,
        tokenizer,
        target_column="target",
        answer_prefix="\nAnswer:",  # between the completion (reasoning) and the scored answer
        append_eos=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=4,
            learning_rate=1e-4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    logs = [h for h in trainer.state.log_history if f"rewards/{reward.__name__}/mean" in h]
    for h in logs:
        print(
            f"step {h['step']}: mean reward (-PPL of the answer) "
            f"{h[f'rewards/{reward.__name__}/mean']:.2f}"
        )
    return {"logs": logs, "reward_name": reward.__name__}


if __name__ == "__main__":
    main()

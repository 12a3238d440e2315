"""A hand-written GRPO-style loop with ``PerplexityReward`` + ``grpo_advantage`` (CPU, < 1 min).

A small trainable module maps the frozen prompt to one continuous "thought" vector r (the
LatentR3 setting); ``gaussian_expand`` makes G rows per prompt (row 0 clean, G-1 perturbed);
each row's reward is -PPL(ground-truth answer | prompt, r^k), computed with the prompt encoded
ONCE (its KV cache shared by the G rows) and the LM head fused with the log-softmax. Only the
thought module trains; the backbone stays frozen.

Two estimators:
* ``--estimator score`` (default): the reward as a black box (no grad), REINFORCE on the
  Gaussian policy ``-A * log N(r^k; r, sigma^2)``; the answer's perplexity drops from ~5 to ~1.4
  in 30 steps here.
* ``--estimator reparam``: LatentR3's loss, advantage-weighted answer log-likelihood with the
  gradient through r, reward and log-probs from the SAME forward (``return_logprobs=True``).
  On this toy it does not improve the reward (see the package's GRPO trainer for the full
  recipe: clipping, batch advantages over many prompts, tuned learning rates).

    python examples/custom_loop_reward.py [--steps 30] [--estimator reparam]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from latentr3_fast.ops import gaussian_expand
from latentr3_fast.reward import PerplexityReward, grpo_advantage


def build(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from latentr3_fast.data import train_tokenizer

    pairs = [
        ("Jazz fan. Listened to Kind of Blue, Giant Steps. Next:", ' "Blue Train"'),
        ("Rock fan. Listened to Abbey Road, Revolver. Next:", ' "Let It Be"'),
        ("Pop fan. Listened to Thriller, Bad. Next:", ' "Dangerous"'),
        ("Grunge fan. Listened to Nevermind, Ten. Next:", ' "Dirt"'),
    ]
    tok = train_tokenizer([p for p, _ in pairs] + [a for _, a in pairs] * 3, vocab_size=320)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False), tok, pairs


def batch(tok, pairs):
    """Left-padded prompts [P, Lp] and right-padded answers (+EOS) [P, T] with masks."""
    p_ids = [tok(p)["input_ids"] for p, _ in pairs]
    t_ids = [tok(a)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
    lp, lt = max(map(len, p_ids)), max(map(len, t_ids))
    pi = torch.tensor([[0] * (lp - len(x)) + x for x in p_ids])
    pm = torch.tensor([[0] * (lp - len(x)) + [1] * len(x) for x in p_ids])
    ti = torch.tensor([x + [0] * (lt - len(x)) for x in t_ids])
    tm = torch.tensor([[1] * len(x) + [0] * (lt - len(x)) for x in t_ids])
    return pi, pm, ti, tm


def warm_up(model, tok, pairs, steps: int = 60) -> None:
    """Teach the random backbone the answer SET, not which answer goes with which prompt
    (each prompt is paired with every answer), so a latent thought has something to fix."""
    texts = [p + a for p, _ in pairs for _, a in pairs]
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    x = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    labels = x.masked_fill(mask == 0, -100)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)


class Thought(nn.Module):
    """Trainable map from the mean prompt embedding to one latent token r [P, 1, d]."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, prompt_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].float()
        return self.net((prompt_embeds * m).sum(1) / m.sum(1))[:, None]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--advantage", default="group", choices=["batch", "group", "none"])
    ap.add_argument("--estimator", default="score", choices=["score", "reparam"])
    args = ap.parse_args(argv)

    model, tok, pairs = build()
    warm_up(model, tok, pairs)
    pi, pm, ti, tm = batch(tok, pairs)
    g = args.num_generations
    reward = PerplexityReward(model, tok)
    thought = Thought(model.config.hidden_size)
    opt = torch.optim.AdamW(thought.parameters(), lr=args.lr, weight_decay=0.0)
    with torch.no_grad():
        prompt_embeds = model.get_input_embeddings()(pi)

    history = []
    for step in range(args.steps):
        r = thought(prompt_embeds, pm)  # [P, 1, d], trainable
        rows, _ = gaussian_expand(r, g, args.sigma)  # [P*G, 1, d]: row p*G = clean r
        if args.estimator == "score":
            # Black-box reward of a Gaussian policy: score the sampled latents without grad,
            # then REINFORCE  -A * log N(r^k; r, sigma^2).
            with torch.no_grad():
                s = reward(pi, pm, ti, tm, extra_embeds=rows, num_generations=g)
            adv = grpo_advantage(s, g, mode=args.advantage)
            sq = (rows.detach() - r.repeat_interleave(g, 0)).pow(2).sum(dim=(1, 2))
            loss = (adv * sq / (2 * args.sigma**2)).mean()
        else:
            # LatentR3's reparameterized loss: reward (detached) and per-token log-probs with
            # grad through r come from the SAME forward.
            s, logp = reward(
                pi, pm, ti, tm, extra_embeds=rows, num_generations=g, return_logprobs=True
            )
            adv = grpo_advantage(s.detach(), g, mode=args.advantage)
            tmask = tm.repeat_interleave(g, 0)
            loss = -(adv * (logp * tmask).sum(1) / tmask.sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(thought.parameters(), 1.0)
        opt.step()
        clean = s.detach().view(-1, g)[:, 0].mean().item()
        history.append(clean)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  clean reward (-PPL) {clean:9.2f}  loss {loss.item():+.4f}")
    print(f"clean reward: {history[0]:.2f} -> {history[-1]:.2f}")
    return {"history": history}


if __name__ == "__main__":
    main()

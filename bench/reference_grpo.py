"""A naive, reference-style GRPO step (what the authors' code does), for tests and benchmarks.

Deliberately shares nothing with the fast path except the model's weights and LatentRATT:

* every row is a FULL sequence ``prompt + [thought]*N + target`` fed through the Hugging Face
  causal LM (``backbone(inputs_embeds=...)``) with the latent vector(s) written into the
  thought slot(s) of the input embeddings;
* full-vocabulary logits at every position, ``log_softmax`` + ``gather`` for the target tokens;
* the prompt is re-run for every row, separately for the reward (no grad) and for the loss;
* the latent comes from a full-sequence forward with ``output_hidden_states`` (logits and all);
* noise, reward, advantage and loss formulas are written out here by hand (not ``ops``).

Rows are processed one prompt at a time, the G rows of a prompt as one batch (they share the
length, so no padding), or several prompts left-padded together (``prompts_per_forward``) to
mimic the reference's micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReferenceResult:
    """Outputs of one reference-style step (rows in ``p*G + k`` order)."""

    logp: list[Tensor]  # per row: [T_p] fp32 target-token log-probs (reward pass)
    rewards: Tensor  # [P*G]
    advantages: Tensor  # [P*G]
    loss: float
    grads: dict[str, Tensor]  # name -> grad of every trainable LatentRATT parameter


def _hidden_and_logits(backbone, embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Full forward (LM head included, as the reference's ``model(...)`` call) -> final-norm
    hidden states [B, S, d] and full-vocabulary logits [B, S, V]."""
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = backbone(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=pos,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1], out.logits


def _latents(model, prompt: Tensor, n: int, first: Tensor | None = None) -> Tensor:
    """r_1..r_n of ONE unpadded prompt [L] via full-sequence forwards -> [n, d] fp32.

    r_{i+1} = LatentRATT(final hidden of [prompt, r_1..r_i]); ``first`` replaces r_1."""
    backbone = model.backbone
    emb = backbone.get_input_embeddings()(prompt[None])  # [1, L, d]
    rs: list[Tensor] = [] if first is None else [first]
    while len(rs) < n:
        x = torch.cat([emb] + [r.to(emb.dtype)[None, None] for r in rs], dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        h, _ = _hidden_and_logits(backbone, x, mask)
        rs.append(model.ratt(h, mask)[0])
    return torch.stack(rs)


def _expand(model, prompt: Tensor, r: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """[N, d] latents of one prompt + noise [G-1, d] -> [G, N, d]: noise on r_1, the later
    steps regenerated from each noisy r_1 (full forwards again)."""
    g, n = noise.shape[0] + 1, r.shape[0]
    rows = [r]
    for k in range(1, g):
        noisy0 = (r[0].float() + sigma * noise[k - 1].float()).to(r.dtype)
        rows.append(_latents(model, prompt, n, first=noisy0))
    return torch.stack(rows)


def _rows_logp(model, prompts: list[Tensor], latents: list[Tensor], targets: list[Tensor]):
    """Target log-probs of full sequences ``prompt + thoughts + target`` (left-padded batch).

    prompts[i]: [L_i] ids; latents[i]: [N, d]; targets[i]: [T_i] ids. Returns a list of [T_i].
    """
    backbone = model.backbone
    embed = backbone.get_input_embeddings()
    tid = model.thought_token_id
    seqs, slots = [], []
    for p, r, t in zip(prompts, latents, targets):
        n = r.shape[0]
        ids = torch.cat([p, torch.full((n,), tid, dtype=p.dtype, device=p.device), t])
        seqs.append(ids)
        slots.append((p.shape[0], n))
    s_max = max(s.shape[0] for s in seqs)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(seqs), s_max), pad, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, s_max - s.shape[0] :] = s
        mask[i, s_max - s.shape[0] :] = 1
    emb = embed(ids)
    # overwrite the thought slots with the latent vectors (reference: inputs_embeds[slot] = r)
    rows = []
    for i, ((lp, n), s) in enumerate(zip(slots, seqs)):
        off = s_max - s.shape[0] + lp
        e = emb[i]
        e = torch.cat([e[:off], latents[i].to(e.dtype), e[off + n :]], dim=0)
        rows.append(e)
    emb = torch.stack(rows)
    _, logits = _hidden_and_logits(backbone, emb, mask)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, S, V]: the reference's cost
    out = []
    for i, ((lp, n), s, t) in enumerate(zip(slots, seqs, targets)):
        start = s_max - s.shape[0] + lp + n - 1  # position predicting t[0]
        pos = torch.arange(start, start + t.shape[0], device=t.device)
        out.append(logprobs[i, pos].gather(-1, t[:, None])[:, 0])
    return out


def reference_advantages(rewards: Tensor, g: int, mode: str) -> Tensor:
    """Hand-written advantages over ONE advantage batch (float64 inside)."""
    s = rewards.double().view(-1, g)
    if mode == "group":
        mean = s.mean(1, keepdim=True)
        std = torch.sqrt(((s - mean) ** 2).sum(1, keepdim=True) / (g - 1))
        return ((s - mean) / (std + 1e-4)).reshape(-1).to(rewards.dtype)
    m = s[:, 0].mean()
    if mode == "none":
        return (s - m).reshape(-1).to(rewards.dtype)
    norm = math.sqrt(float(((s - m) ** 2).sum()))
    return ((s - m) / (norm + 1e-6)).reshape(-1).to(rewards.dtype)


def reference_grpo_step(
    model,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    noise: Tensor,
    sigma: float = 1.5,
    advantage: str = "batch",
    advantage_batch: int | None = None,
    include_clean: bool = True,
    epsilon: float = 0.2,
    epsilon_high: float = 0.28,
    prompts_per_forward: int = 1,
    backward: bool = True,
    advantages: Tensor | None = None,
) -> ReferenceResult:
    """One reference-style GRPO step over P prompts (1 inner iteration, frozen backbone).

    Args:
        model: LatentReasoner (uses ``backbone``, ``ratt``, ``thought_token_id``,
            ``num_latent``, ``tokenizer.pad_token_id``).
        prompt_ids / target_ids: P unpadded token-id lists (target includes EOS).
        noise: [P, G-1, d] standard-normal noise (injected, shared with the fast path).
        advantage_batch: prompts per advantage batch (default: all P).
        prompts_per_forward: prompts whose G rows share one (left-padded) forward.
        backward: run the loss backward and return the LatentRATT grads.
        advantages: [P*G] use these instead of computing them (to isolate the loss/grad check
            from the conditioning of "group" normalization).
    """
    dev = model.device
    p_count = len(prompt_ids)
    g = noise.shape[1] + 1
    n = model.num_latent
    prompts = [torch.tensor(list(p), dtype=torch.long, device=dev) for p in prompt_ids]
    targets = [torch.tensor(list(t), dtype=torch.long, device=dev) for t in target_ids]
    noise = noise.to(dev)

    def chunks(grad: bool):
        """Yield (first row index, [row logp]) per forward chunk of ``prompts_per_forward``."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        for s in range(0, p_count, prompts_per_forward):
            with ctx:
                ps, ls, ts = [], [], []
                for p in range(s, min(p_count, s + prompts_per_forward)):
                    r = _latents(model, prompts[p], n)  # one full prompt forward per step
                    exp = _expand(model, prompts[p], r, noise[p], sigma)  # [G, N, d]
                    for k in range(g):
                        ps.append(prompts[p])
                        ls.append(exp[k])
                        ts.append(targets[p])
                yield s * g, _rows_logp(model, ps, ls, ts)

    # 1) reward pass (no grad): -exp(-mean log p)
    logp = [lp for _, part in chunks(grad=False) for lp in part]
    rewards = torch.stack([-torch.exp(-lp.mean()) for lp in logp]).float()
    # 2) advantages per advantage batch
    ab = p_count if advantage_batch is None else advantage_batch
    adv = torch.cat(
        [
            reference_advantages(rewards[s * g : (s + ab) * g], g, advantage)
            for s in range(0, p_count, ab)
        ]
    )
    if advantages is not None:
        adv = advantages.detach().to(adv.dtype).cpu()
    # 3) loss pass (grad), backward per forward chunk (as gradient accumulation would):
    #    -mean_rows A * mean_tok(min(ratio A, clip(ratio) A)), ratio = pi/pi_old (value 1)
    for prm in model.ratt.parameters():
        prm.grad = None
    n_keep = p_count * (g if include_clean else g - 1)
    loss_val = 0.0
    if backward:
        for first, part in chunks(grad=True):
            rows = []
            for j, lp in enumerate(part):
                i = first + j
                if not include_clean and i % g == 0:
                    continue
                ratio = torch.exp(lp - lp.detach())
                a = adv[i]
                clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
                rows.append(-torch.minimum(ratio * a, clipped * a).mean())
            loss = torch.stack(rows).sum() / n_keep
            loss.backward()
            loss_val += float(loss.detach())
    grads = {
        name: (prm.grad.detach().clone() if prm.grad is not None else torch.zeros_like(prm))
        for name, prm in model.ratt.named_parameters()
    }
    return ReferenceResult([lp.detach() for lp in logp], rewards, adv, loss_val, grads)

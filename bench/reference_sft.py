"""Reference-style SFT step (the authors' code for paper Sec. 3.2.1, Eq. 4), for benchmarks.

Two (or N+1) FULL causal-LM forwards, each materialising full-vocabulary logits at every
position: first over the prompt (the hidden states give r through LatentRATT; the logits are
computed and thrown away), then over ``[prompt, r, target]`` as ``inputs_embeds`` with
``labels``, so the LM head runs over all ``Lp + N + T`` positions and the loss is Hugging Face's
shifted cross-entropy (mean over the target tokens).

Positions follow the padding mask (``cumsum - 1``, as ``generate`` does) so that the result is
numerically comparable to the package's cached path; none of the authors' code is copied.
"""

from __future__ import annotations

import torch


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def reference_sft_loss(model, batch) -> torch.Tensor:
    """Token-mean target cross-entropy of a LatentReasoner, computed the reference way.

    Args:
        model: a ``LatentReasoner`` (uses ``backbone``, ``ratt``/latent mode, ``num_latent``).
        batch: ``data.Batch`` (left-padded prompts, right-padded targets) on the model device.
    Returns:
        0-d fp32 loss with grad.
    """
    bb = model.backbone
    emb = bb.get_input_embeddings()
    prompt, pmask = batch.prompt_ids, batch.prompt_mask
    target, tmask = batch.target_ids, batch.target_mask
    b = prompt.shape[0]
    n = model.num_latent
    p_emb = emb(prompt)
    rs: list[torch.Tensor] = []
    for _ in range(max(n, 0)):
        # full forward (LM head over every position) just to read the last hidden states
        e = torch.cat([p_emb] + [r[:, None].to(p_emb.dtype) for r in rs], dim=1)
        m = torch.cat([pmask, pmask.new_ones(b, len(rs))], dim=1)
        out = bb(
            inputs_embeds=e, attention_mask=m, position_ids=_positions(m), output_hidden_states=True
        )
        rs.append(model._latent_step(out.hidden_states[-1], m))
    embeds = torch.cat([p_emb] + [r[:, None].to(p_emb.dtype) for r in rs] + [emb(target)], dim=1)
    mask = torch.cat([pmask, pmask.new_ones(b, n), tmask], dim=1)
    labels = torch.full_like(mask, -100)
    labels[:, prompt.shape[1] + n :] = target.masked_fill(tmask == 0, -100)
    out = bb(
        inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), labels=labels
    )
    return out.loss.float()

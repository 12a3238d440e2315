"""Fused LM head + log-softmax + gather: ``logp[m] = log softmax(h[m] @ W.T / temperature)[t[m]]``,
the per-token log-probability of the SFT loss (paper Sec. 3.2.1, Eq. 4), the perplexity reward
(Eq. 6) and the GRPO ratio (Eq. 8).

Never materializes the ``[M, V]`` logits. The torch path below walks V (and M) in chunks with
an online log-sum-exp and recomputes the chunks in backward, so its memory is bounded by one
``[chunk_rows, chunk_vocab]`` block; the Triton path (``latentr3_fast.kernels.linear_logprob``)
does the same in registers.
"""

from __future__ import annotations

import torch

from ..kernels._checks import check_logprob_args
from ._dispatch import select_backend

# Elements of one fp32 logits block of the torch path: 2**22 floats = 16 MiB. Large enough that
# each chunk is one efficient GEMM, small enough that memory stays far below [M, V].
DEFAULT_CHUNK_ELEMENTS = 1 << 22
DEFAULT_CHUNK_ROWS = 1024


def _chunk_sizes(rows: int, vocab: int, chunk_rows: int | None, chunk_vocab: int | None):
    rows_per_chunk = max(1, min(rows, chunk_rows or DEFAULT_CHUNK_ROWS))
    vocab_per_chunk = chunk_vocab or max(1024, DEFAULT_CHUNK_ELEMENTS // rows_per_chunk)
    return rows_per_chunk, max(1, min(vocab, vocab_per_chunk))


def _block_logits(h, w, b, inv_temperature):
    """fp32 logits of one block: (h @ w.T + b) / temperature, GEMM in the input dtype."""
    z = (h @ w.T).float()
    if b is not None:
        z = z + b.float()
    if inv_temperature != 1.0:
        z = z * inv_temperature
    return z


def _target_columns(target_ids: torch.Tensor, v0: int, v1: int):
    """(rows whose target lies in vocabulary block [v0, v1), its column there, clamped)."""
    inside = (target_ids >= v0) & (target_ids < v1)
    col = (target_ids - v0).clamp_(0, v1 - v0 - 1)[:, None]  # masked gather: no host sync
    return inside, col


def _forward_row_chunk(h, w_all, bias, target_ids, inv_temperature, chunk_vocab, grad_in_forward):
    """Online log-sum-exp over the vocabulary blocks of one row chunk.

    Returns ``(lse [m], target logit [m], dlogp/dh [m, d] or None)``, all fp32. With
    ``grad_in_forward`` (frozen head) ``dlogp[m]/dh[m] = (W[t_m] - E_softmax[W]) / temperature``
    depends on row m only, so ``E_softmax[W]`` is accumulated online (flash-attention style
    rescaling) and backward becomes a row scaling: 2 GEMMs in all instead of 3.
    """
    rows, device, vocab = h.shape[0], h.device, w_all.shape[0]
    run_max = torch.full((rows,), float("-inf"), device=device)
    run_sum = torch.zeros(rows, device=device)
    target_logit = torch.zeros(rows, device=device)
    expected_weight = torch.zeros(rows, h.shape[1], device=device) if grad_in_forward else None
    for v0 in range(0, vocab, chunk_vocab):
        v1 = min(vocab, v0 + chunk_vocab)
        w = w_all[v0:v1]
        z = _block_logits(h, w, None if bias is None else bias[v0:v1], inv_temperature)
        # Target logit from the same block values as the lse (so logp(argmax) is exactly 0 even
        # at |logits| ~ 1e4, where fp32 rounding is ~1e-3).
        inside, col = _target_columns(target_ids, v0, v1)
        target_logit = torch.where(inside, z.gather(1, col).squeeze(1), target_logit)
        # Online log-sum-exp, in place on the block (no extra [rows, chunk_vocab] temporaries).
        new_max = torch.maximum(run_max, z.amax(dim=1))
        e = z.sub_(new_max[:, None]).exp_()
        alpha = torch.exp(run_max - new_max)
        run_sum = run_sum * alpha + e.sum(dim=1)
        if grad_in_forward:
            expected_weight.mul_(alpha[:, None]).add_((e.to(w_all.dtype) @ w).float())
        run_max = new_max
        del z, e  # free the block before the next one is allocated
    lse = run_max + torch.log(run_sum)
    if not grad_in_forward:
        return lse, target_logit, None
    dlogp_dhidden = (
        w_all[target_ids].float() - expected_weight / run_sum[:, None]
    ) * inv_temperature
    return lse, target_logit, dlogp_dhidden


def _backward_row_chunk(h, w_all, bias, target_ids, lse, scale, inv_temperature, chunk_vocab,
                        grads, m0, m1):  # fmt: skip
    """Add one row chunk's contribution to the fp32 gradient buffers ``grads = (dh, dw, db)``
    (None where not needed), recomputing each logits block from the saved log-sum-exp."""
    dh, dw, db = grads
    vocab = w_all.shape[0]
    for v0 in range(0, vocab, chunk_vocab):
        v1 = min(vocab, v0 + chunk_vocab)
        w = w_all[v0:v1]
        z = _block_logits(h, w, None if bias is None else bias[v0:v1], inv_temperature)
        g = torch.exp_(z.sub_(lse))  # softmax block, in place
        inside, col = _target_columns(target_ids, v0, v1)
        g.scatter_add_(1, col, -inside.to(g.dtype)[:, None])  # softmax - onehot
        g.mul_(-scale)  # = grad_out / temperature * (onehot - softmax)
        g_compute = g.to(w_all.dtype)
        if dh is not None:
            dh[m0:m1] += (g_compute @ w).float()
        if dw is not None:
            dw[v0:v1] += (g_compute.T @ h).float()
        if db is not None:
            db[v0:v1] += g.sum(dim=0)
        del z, g, g_compute


class _ChunkedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, chunk_rows,
                chunk_vocab, grad_in_forward):  # fmt: skip
        rows = hidden.shape[0]
        inv_temperature = 1.0 / float(temperature)
        # GEMMs run in the weight's dtype: converting the small hidden, never the [V, d] head.
        h_all = hidden.to(weight.dtype)
        valid = targets != ignore_index
        target_ids = torch.where(valid, targets, torch.zeros_like(targets)).long()
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        dlogp_dhidden = (
            torch.empty(rows, hidden.shape[1], device=hidden.device) if grad_in_forward else None
        )
        for m0 in range(0, rows, chunk_rows):
            m1 = min(rows, m0 + chunk_rows)
            chunk_lse, chunk_target, chunk_grad = _forward_row_chunk(
                h_all[m0:m1], weight, bias, target_ids[m0:m1], inv_temperature, chunk_vocab,
                grad_in_forward,
            )  # fmt: skip
            lse[m0:m1] = chunk_lse
            target_logit[m0:m1] = chunk_target
            if grad_in_forward:
                dlogp_dhidden[m0:m1] = chunk_grad
        logp = torch.where(valid, target_logit - lse, torch.zeros_like(lse))
        if grad_in_forward:
            ctx.save_for_backward(dlogp_dhidden, valid)
        else:
            ctx.save_for_backward(hidden, weight, target_ids, valid, bias, lse)
        ctx.cfg = (inv_temperature, chunk_rows, chunk_vocab, grad_in_forward, hidden.dtype)
        ctx.mark_non_differentiable(lse)  # callers reuse it; gradients flow through logp
        return logp, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        inv_temperature, chunk_rows, chunk_vocab, grad_in_forward, hidden_dtype = ctx.cfg
        no_grads = (None,) * 8  # targets, ..., grad_in_forward
        if grad_in_forward:
            dlogp_dhidden, valid = ctx.saved_tensors
            scale = torch.where(
                valid, grad_out.float(), torch.zeros_like(grad_out, dtype=torch.float32)
            )
            return ((scale[:, None] * dlogp_dhidden).to(hidden_dtype), *no_grads)
        hidden, weight, target_ids, valid, bias, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        rows, vocab = hidden.shape[0], weight.shape[0]
        h_all = hidden.to(weight.dtype)
        # d logp / d z = onehot(t) - softmax(z); times grad_out and 1/temperature; ignored rows 0.
        scale = torch.where(valid, grad_out.float(), torch.zeros_like(lse)) * inv_temperature
        f32 = dict(dtype=torch.float32, device=weight.device)
        f32_on_hidden = dict(dtype=torch.float32, device=hidden.device)
        dh = torch.zeros(rows, hidden.shape[1], **f32_on_hidden) if need_h else None
        dw = torch.zeros(weight.shape, **f32) if need_w else None
        db = torch.zeros(vocab, **f32) if need_b else None
        for m0 in range(0, rows, chunk_rows):
            m1 = min(rows, m0 + chunk_rows)
            _backward_row_chunk(
                h_all[m0:m1], weight, bias, target_ids[m0:m1], lse[m0:m1, None],
                scale[m0:m1, None], inv_temperature, chunk_vocab, (dh, dw, db), m0, m1,
            )  # fmt: skip
        grad_hidden = dh.to(hidden.dtype) if need_h else None
        grad_weight = dw.to(weight.dtype) if need_w else None
        grad_bias = db.to(bias.dtype) if need_b else None
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None


def fused_linear_logprob_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked torch implementation of :func:`fused_linear_logprob` (any device).

    ``hidden [M, d]``, ``weight [V, d]``, ``targets [M]`` -> ``[M]`` fp32 log-probs. Memory is
    bounded by one fp32 ``[chunk_rows, chunk_vocab]`` block (default 16 MiB). With a frozen head
    (the GRPO case) the forward also accumulates ``dlogp/dh`` online, so backward is a row
    scaling; otherwise backward recomputes the blocks from the saved log-sum-exp. GEMMs run in
    ``weight.dtype`` (hidden is converted, never the head); softmax math in fp32.
    """
    check_logprob_args(hidden, weight, targets, bias, ignore_index, temperature)
    rows_per_chunk, vocab_per_chunk = _chunk_sizes(
        hidden.shape[0], weight.shape[0], chunk_rows, chunk_vocab
    )
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logp = empty + 0.0 * hidden.sum()
        return (logp, empty) if return_lse else logp
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    grad_in_forward = torch.is_grad_enabled() and hidden.requires_grad and frozen_head
    logp, lse = _ChunkedLinearLogprob.apply(
        hidden, weight, targets, bias, int(ignore_index), float(temperature), rows_per_chunk,
        vocab_per_chunk, grad_in_forward,
    )  # fmt: skip
    return (logp, lse) if return_lse else logp


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[M, d]`` fp32/fp16/bf16 hidden states (the positions that predict targets).
        weight: ``[V, d]`` LM-head weight.
        targets: ``[M]`` int64 token ids; rows equal to ``ignore_index`` give 0 and no gradient.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it (> 0).
        return_lse: also return the normalizer, computed in the same pass.

    Returns:
        ``[M]`` fp32 log-probs. Differentiable wrt ``hidden`` (and ``weight``/``bias`` when they
        require grad). The ``[M, V]`` logits are never materialized. Triton on CUDA, chunked
        torch otherwise (see ``LATENTR3_KERNELS``). With ``return_lse``: ``(logp, lse)``,
        ``lse`` ``[M]`` fp32 the log-sum-exp of the temperature-scaled logits of every row
        (``ignore_index`` rows too), without gradient: ``logp = logit[target] / T - lse``.
    """
    if select_backend(hidden, weight) == "triton":
        from ..kernels.linear_logprob import fused_linear_logprob_triton

        return fused_linear_logprob_triton(
            hidden,
            weight,
            targets,
            bias,
            ignore_index=ignore_index,
            temperature=temperature,
            return_lse=return_lse,
        )
    return fused_linear_logprob_torch(
        hidden, weight, targets, bias, ignore_index, temperature, return_lse=return_lse
    )

"""Fused LM head + log-softmax + gather: ``logp[m] = log softmax(h[m] @ W.T / T)[t[m]]``.

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
    cr = max(1, min(rows, chunk_rows or DEFAULT_CHUNK_ROWS))
    cv = chunk_vocab or max(1024, DEFAULT_CHUNK_ELEMENTS // cr)
    return cr, max(1, min(vocab, cv))


def _block_logits(h, w, b, inv_t):
    """fp32 logits of one block: (h @ w.T + b) / T, GEMM in the input dtype."""
    z = (h @ w.T).float()
    if b is not None:
        z = z + b.float()
    if inv_t != 1.0:
        z = z * inv_t
    return z


class _ChunkedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, cr, cv, eager):
        rows, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / float(temperature)
        # GEMMs run in the weight's dtype: converting the small hidden, never the [V, d] head.
        cdt = weight.dtype
        h_all, w_all = hidden.to(cdt), weight
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.zeros_like(targets)).long()
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        tlogit = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        # Frozen head (eager): d logp[m] / d h[m] = (W[t_m] - E_softmax[W]) / T depends on row m
        # only, so E_softmax[W] is accumulated online (flash-attention style rescaling) during
        # the forward and backward is a row scaling: 2 GEMMs in all instead of 3 (recompute).
        jac = torch.empty(rows, hidden.shape[1], device=hidden.device) if eager else None
        for m0 in range(0, rows, cr):
            m1 = min(rows, m0 + cr)
            h = h_all[m0:m1]
            t = tgt[m0:m1]
            run_max = torch.full((m1 - m0,), float("-inf"), device=hidden.device)
            run_sum = torch.zeros(m1 - m0, device=hidden.device)
            zt = torch.zeros(m1 - m0, device=hidden.device)
            acc = torch.zeros(m1 - m0, hidden.shape[1], device=hidden.device) if eager else None
            for v0 in range(0, vocab, cv):
                v1 = min(vocab, v0 + cv)
                w = w_all[v0:v1]
                z = _block_logits(h, w, None if bias is None else bias[v0:v1], inv_t)
                # Target logit from the same block values as the lse (so logp(argmax) is
                # exactly 0 even at |logits| ~ 1e4, where fp32 rounding is ~1e-3).
                inside = (t >= v0) & (t < v1)
                col = (t - v0).clamp_(0, v1 - v0 - 1)[:, None]  # masked gather: no host sync
                zt = torch.where(inside, z.gather(1, col).squeeze(1), zt)
                # Online log-sum-exp, in place on the block (no extra [m, cv] temporaries).
                new_max = torch.maximum(run_max, z.amax(dim=1))
                e = z.sub_(new_max[:, None]).exp_()
                alpha = torch.exp(run_max - new_max)
                run_sum = run_sum * alpha + e.sum(dim=1)
                if eager:
                    acc.mul_(alpha[:, None]).add_((e.to(cdt) @ w).float())
                run_max = new_max
                del z, e  # free the block before the next one is allocated
            lse[m0:m1] = run_max + torch.log(run_sum)
            tlogit[m0:m1] = zt
            if eager:
                jac[m0:m1] = (w_all[t].float() - acc / run_sum[:, None]) * inv_t
        logp = torch.where(valid, tlogit - lse, torch.zeros_like(lse))
        if eager:
            ctx.save_for_backward(jac, valid)
        else:
            ctx.save_for_backward(hidden, weight, tgt, valid, bias, lse)
        ctx.cfg = (inv_t, cr, cv, eager, hidden.dtype)
        ctx.mark_non_differentiable(lse)  # callers reuse it; gradients flow through logp
        return logp, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        inv_t, cr, cv, eager, hdtype = ctx.cfg
        if eager:
            jac, valid = ctx.saved_tensors
            scale = torch.where(
                valid, grad_out.float(), torch.zeros_like(grad_out, dtype=torch.float32)
            )
            return (scale[:, None] * jac).to(hdtype), None, None, None, None, None, None, None, None
        hidden, weight, tgt, valid, bias, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        rows, vocab = hidden.shape[0], weight.shape[0]
        cdt = weight.dtype
        h_all, w_all = hidden.to(cdt), weight
        # d logp / d z = onehot(t) - softmax(z); times grad_out and 1/T; ignored rows get 0.
        scale = torch.where(valid, grad_out.float(), torch.zeros_like(lse)) * inv_t
        dh = (
            torch.zeros(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device)
            if need_h
            else None
        )
        dw = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        for m0 in range(0, rows, cr):
            m1 = min(rows, m0 + cr)
            h, s, t = h_all[m0:m1], scale[m0:m1, None], tgt[m0:m1]
            lse_c = lse[m0:m1, None]
            for v0 in range(0, vocab, cv):
                v1 = min(vocab, v0 + cv)
                w = w_all[v0:v1]
                z = _block_logits(h, w, None if bias is None else bias[v0:v1], inv_t)
                g = torch.exp_(z.sub_(lse_c))  # softmax block, in place
                inside = (t >= v0) & (t < v1)
                col = (t - v0).clamp_(0, v1 - v0 - 1)[:, None]
                g.scatter_add_(1, col, -inside.to(g.dtype)[:, None])  # softmax - onehot
                g.mul_(-s)  # = grad_out/T * (onehot - softmax)
                gc = g.to(cdt)
                if need_h:
                    dh[m0:m1] += (gc @ w).float()
                if need_w:
                    dw[v0:v1] += (gc.T @ h).float()
                if need_b:
                    db[v0:v1] += g.sum(dim=0)
                del z, g, gc
        dhid = dh.to(hidden.dtype) if need_h else None
        dwt = dw.to(weight.dtype) if need_w else None
        dbs = db.to(bias.dtype) if need_b else None
        return dhid, dwt, None, dbs, None, None, None, None, None


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

    Memory is bounded by one fp32 ``[chunk_rows, chunk_vocab]`` block (default 16 MiB). With a
    frozen head (the GRPO case) the forward also accumulates ``dlogp/dh`` online, so backward
    is a row scaling; otherwise backward recomputes the blocks from the saved log-sum-exp.
    GEMMs run in ``weight.dtype`` (hidden is converted, never the head); softmax math in fp32.
    """
    check_logprob_args(hidden, weight, targets, bias, ignore_index, temperature)
    cr, cv = _chunk_sizes(hidden.shape[0], weight.shape[0], chunk_rows, chunk_vocab)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logp = empty + 0.0 * hidden.sum()
        return (logp, empty) if return_lse else logp
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    eager = torch.is_grad_enabled() and hidden.requires_grad and frozen_head
    logp, lse = _ChunkedLinearLogprob.apply(
        hidden, weight, targets, bias, int(ignore_index), float(temperature), cr, cv, eager
    )
    return (logp, lse) if return_lse else logp


def naive_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The reference-style path: full ``[M, V]`` logits + log_softmax + gather (benchmarks)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    out = logp.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


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

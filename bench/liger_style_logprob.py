"""A Liger-style chunked linear log-prob, written here as a benchmark reference.

The approach of Liger-Kernel's fused linear cross-entropy (not its code): split the rows into
chunks so that one chunk's ``[chunk, V]`` logits are about as large as the hidden states; for
each chunk materialize the logits with one GEMM, take the log-softmax, and compute the
gradients right away in the FORWARD (``dH = g @ W``, ``dW += g.T @ H``), so the backward only
scales the stored gradients by the upstream scalar. That needs a scalar loss: this module
returns ``sum(logp)`` (SFT-style), whose gradient wrt each log-prob is 1.
"""

from __future__ import annotations

import torch


def _chunk_rows(rows: int, vocab: int, dim: int) -> int:
    # Liger's rule of thumb: chunk x V logits ~ the size of the [M, d] input, power of two.
    chunks = max(1, -(-vocab // dim))
    per = max(1, -(-rows // chunks))
    return 1 << (per - 1).bit_length()


class _LigerStyleSumLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, need_w):
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        h_all = hidden.to(weight.dtype)
        chunk = _chunk_rows(rows, vocab, dim)
        need_h = hidden.requires_grad
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dw = dw if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for m0 in range(0, rows, chunk):
            h = h_all[m0 : m0 + chunk]
            t = targets[m0 : m0 + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=1)
            total += (logits.gather(1, t[:, None]).squeeze(1) - lse).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_().neg_()  # -softmax, in place
                g.scatter_add_(1, t[:, None], torch.ones_like(g[:, :1]))  # + onehot
                gc = g.to(weight.dtype)
                if need_h:
                    dh[m0 : m0 + chunk] = gc @ weight
                if need_w:
                    dw += (gc.T @ h).float()
                del g, gc
            del logits
        ctx.save_for_backward(*(x for x in (dh, dw) if x is not None))
        ctx.flags = (need_h, need_w, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        need_h, need_w, wdtype = ctx.flags
        saved = list(ctx.saved_tensors)
        dh = dw = None
        if need_h:
            dh = saved.pop(0)
            dh = (dh.float() * grad_total).to(dh.dtype)
        if need_w:
            dw = (saved.pop(0) * grad_total).to(wdtype)
        return dh, dw, None, None


def liger_style_sum_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``sum_m log softmax(hidden @ weight.T)[m, targets[m]]``; gradients computed in forward.

    Args:
        hidden: ``[M, d]``; weight: ``[V, d]``; targets: ``[M]`` int64 (no ignored rows).

    Returns:
        A scalar fp32 tensor; differentiable wrt ``hidden`` (and ``weight`` if it requires grad).
    """
    return _LigerStyleSumLogprob.apply(hidden, weight, targets, weight.requires_grad)

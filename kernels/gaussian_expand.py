"""Triton GRPO latent expansion with in-kernel Philox noise (the sampling of paper Sec. 3.2.2,
Eq. 5: ``r^k = r + eps``, ``eps ~ N(0, sigma^2)``, with ``r^0 = r``).

One program per (output row, latent step, d block). Row ``p*G + k`` copies ``r[p, n]``; on
step 0 of rows k >= 1 it adds ``sigma * eps`` with ``eps = tl.randn(seed, offset)`` where
``offset`` is the element's index in the ``[P, G-1, d]`` noise tensor, so the noise depends
only on (seed, element) — not on block sizes or launch order — and is stored once for the
loss/reward to reuse. The destination can be any strided ``[P*G, N, d]`` view, e.g. the latent
slots of the suffix-embedding buffer, so the expansion costs no extra copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_expand_args, default_seed, interpreting


@triton.jit
def _expand_kernel(
    R,
    NOISE,
    OUT,
    seed,
    sigma,
    num_generations,
    D,
    stride_rp,
    stride_rn,
    stride_rd,
    stride_op,
    stride_on,
    stride_od,
    HAS_NOISE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    p = row // num_generations
    k = row % num_generations
    # int64 row offsets: [P*G, L, d] suffix buffers can pass 2**31 elements.
    src = R + p.to(tl.int64) * stride_rp + n * stride_rn
    x = tl.load(src + cols * stride_rd, mask=ok, other=0.0)
    x = x.to(tl.float32)
    if (n == 0) & (k > 0):
        offs = (p.to(tl.int64) * (num_generations - 1) + (k - 1)) * D + cols
        if HAS_NOISE:
            eps = tl.load(NOISE + offs, mask=ok, other=0.0)
        else:
            eps = tl.randn(seed, offs)
            tl.store(NOISE + offs, eps, mask=ok)
        x = x + sigma * eps
    dst = OUT + row.to(tl.int64) * stride_op + n * stride_on + cols * stride_od
    tl.store(dst, x.to(OUT.dtype.element_ty), mask=ok)


# BLOCK_D on a GPU (4 warps): 1024 gives each thread 8 contiguous elements (128-bit loads for
# bf16, two for fp32); 256 for small d. The interpreter takes one block per row.
GPU_BLOCKS = (256, 1024)


def reachable_blocks() -> tuple[int, ...]:
    """Every BLOCK_D a GPU launch can use (compiled by the code-generation test)."""
    return GPU_BLOCKS


def _block(d: int) -> int:
    if interpreting():
        return min(4096, triton.next_power_of_2(d))
    return GPU_BLOCKS[0] if d <= GPU_BLOCKS[0] else GPU_BLOCKS[1]


def _launch(r, noise, out, seed, sigma, g, has_noise):
    p, n, d = r.shape
    if p * g * n * d == 0:
        return
    block = _block(d)
    _expand_kernel[(p * g, n, triton.cdiv(d, block))](
        r, noise, out, int(seed), float(sigma), g, d,
        r.stride(0), r.stride(1), r.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HAS_NOISE=has_noise, BLOCK_D=block, num_warps=4,
    )  # fmt: skip


class _TritonExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, r, noise, seed, sigma, g, has_noise):
        # ``out`` comes first: autograd's CopySlices (in-place into a view of the suffix
        # buffer) routes the gradient of a dirty view to the Function's first input slot.
        _launch(r, noise, out, seed, sigma, g, has_noise)
        ctx.g = g
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = ctx.g
        pg, n, d = grad.shape
        # Every output row of group p is r[p] (+ a constant): dr = sum over the group's rows.
        dr = grad.reshape(pg // g, g, n, d).sum(dim=1) if ctx.needs_input_grad[1] else None
        # The overwritten slots of ``out`` get zero gradient (an explicit zero: CopySlices drops
        # the whole base gradient when given None).
        dout = torch.zeros_like(grad) if ctx.needs_input_grad[0] else None
        return dout, dr, None, None, None, None, None


def gaussian_expand_triton(
    r: torch.Tensor,
    num_generations: int,
    sigma: float,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``latentr3_fast.ops.gaussian_expand`` (Philox noise).

    Args:
        r: ``[P, N, d]``; noise: optional ``[P, G-1, d]`` used verbatim; seed: Philox seed;
        out: optional ``[P*G, N, d]`` destination view written in place.

    Returns:
        ``(expanded [P*G, N, d], noise [P, G-1, d] fp32)``; gradient flows to ``r``.
    """
    check_expand_args(r, num_generations, sigma, noise, out)
    p, n, d = r.shape
    g = int(num_generations)
    has_noise = noise is not None
    if has_noise:
        noise = noise.detach().to(device=r.device, dtype=torch.float32).contiguous()
    else:
        noise = torch.empty(p, g - 1, d, dtype=torch.float32, device=r.device)
        if seed is None:
            seed = default_seed(r.device)
    if n == 0 and not has_noise:
        # No latent step to perturb; still hand back the noise the step would have used.
        noise.normal_()
    if out is None:
        out = torch.empty(p * g, n, d, dtype=r.dtype, device=r.device)
    seed = 0 if seed is None else int(seed) & 0x7FFFFFFF
    # Through autograd whenever a gradient can flow: from r, or into a buffer that needs one
    # (the overwritten slots must then get no gradient, which mark_dirty arranges).
    if torch.is_grad_enabled() and (r.requires_grad or out.requires_grad):
        expanded = _TritonExpand.apply(out, r, noise, seed, float(sigma), g, has_noise)
    else:
        _launch(r.detach(), noise, out, seed, float(sigma), g, has_noise)
        expanded = out
    return expanded, noise

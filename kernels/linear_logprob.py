"""Triton fused LM head + log-softmax + gather (forward and backward).

Forward: a grid of (row block, vocabulary split) programs; each walks its V tiles, computes the
``[BLOCK_M, BLOCK_V]`` logits tile as a K-loop of ``tl.dot`` in fp32 accumulation, and keeps
an online (max, sum-exp) per row plus the target logit. The per-split partials ``[S, M]`` are
merged by a few tiny torch ops. The ``[M, V]`` logits never exist in memory.

Backward recomputes every logits tile from the saved per-row log-sum-exp, forms
``g = (onehot - softmax) * grad_out / T`` in registers and adds ``g @ W`` into dH (and
``g.T @ H`` into dW, ``sum(g)`` into db, only when those need grad) with fp32 atomics.

Precision: every load is converted to fp32 at once (the interpreter computes bf16 wrongly).
fp32 inputs use IEEE dots; fp16/bf16 inputs use TF32 dots, which is exact for them (their
mantissas fit TF32's) while running on tensor cores.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from latentr3_fast.ops._dispatch import interpreting
from latentr3_fast.ops.logprob import check_logprob_args


@triton.jit
def _logits_tile(
    H,
    W,
    B,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_t,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        h = tl.load(
            H + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            W + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _fwd_kernel(
    H,
    W,
    B,
    T,
    PART_MAX,
    PART_SUM,
    PART_TGT,
    M,
    V,
    D,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_t,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(T + rows, mask=row_ok, other=-1)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tile0 = pid_s * tiles_per_split
    tile1 = tl.minimum(tile0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile0, tile1):  # every tile holds >= 1 real column: max stays finite
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            H, W, B, rows, cols, row_ok, col_ok, D, stride_hm, stride_hk, stride_wv, stride_wk,
            inv_t, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_s * M + rows
    tl.store(PART_MAX + out, m_i, mask=row_ok)
    tl.store(PART_SUM + out, l_i, mask=row_ok)
    tl.store(PART_TGT + out, t_i, mask=row_ok)


@triton.jit
def _bwd_kernel(
    H,
    W,
    B,
    T,
    LSE,
    SCALE,
    DH,
    DW,
    DB,
    M,
    V,
    D,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_t,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(T + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)  # grad_out / T, 0 on ignored rows
    tile0 = pid_s * tiles_per_split
    tile1 = tl.minimum(tile0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile0, tile1):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            H, W, B, rows, cols, row_ok, col_ok, D, stride_hm, stride_hk, stride_wv, stride_wk,
            inv_t, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        g = (onehot - p) * scale[:, None]  # d loss / d (h @ W.T + b)
        if NEED_DB:
            tl.atomic_add(DB + cols, tl.sum(g, axis=0), mask=col_ok)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            if NEED_DH:
                w = tl.load(
                    W + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                dh = tl.dot(g, w, input_precision=PRECISION)
                tl.atomic_add(
                    DH + rows[:, None] * D + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :]
                )
            if NEED_DW:
                h = tl.load(
                    H + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                dw = tl.dot(tl.trans(g), h, input_precision=PRECISION)
                tl.atomic_add(
                    DW + cols[:, None] * D + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :]
                )


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(
    rows: int,
    vocab: int,
    dim: int,
    device: torch.device,
    block_v: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> dict:
    """Block sizes and the vocabulary split (heuristics, no autotuning; overridable)."""
    if interpreting() or device.type != "cuda":
        # The interpreter pays per op, not per element: few, large tiles, one split.
        bm, bv, bk, warps = max(16, min(64, _pow2(rows))), 512, max(16, min(128, _pow2(dim))), 4
        want = 1
    else:
        bm = 16 if rows <= 16 else (32 if rows <= 32 else 64)
        bv, bk, warps = 128, 64, 4
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        want = None
    bv, bk = block_v or bv, block_k or bk
    m_blocks = triton.cdiv(rows, bm)
    tiles = triton.cdiv(vocab, bv)
    if splits is not None:
        want = splits
    elif want is None:  # ~4 waves of programs on the GPU
        want = max(1, (4 * sms) // m_blocks)
    tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, want)))
    n_splits = triton.cdiv(tiles, tiles_per_split)  # every split gets >= 1 tile
    return dict(bm=bm, bv=bv, bk=bk, warps=warps, m_blocks=m_blocks, splits=n_splits,
                tps=tiles_per_split)  # fmt: skip


def _precision(*tensors: torch.Tensor) -> str:
    # TF32 is exact for fp16/bf16 operands; fp32 operands need IEEE for 1e-5 accuracy.
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


class _TritonLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, overrides):
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        cfg = _config(rows, vocab, dim, hidden.device, **overrides)
        inv_t = 1.0 / float(temperature)
        tgt = targets.to(torch.int64).contiguous()
        parts = torch.empty(3, cfg["splits"], rows, dtype=torch.float32, device=hidden.device)
        prec = _precision(hidden, weight)
        _fwd_kernel[(cfg["m_blocks"], cfg["splits"])](
            hidden, weight, bias if bias is not None else hidden, tgt,
            parts[0], parts[1], parts[2],
            rows, vocab, dim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_t, cfg["tps"],
            HAS_BIAS=bias is not None, PRECISION=prec,
            BLOCK_M=cfg["bm"], BLOCK_V=cfg["bv"], BLOCK_K=cfg["bk"], num_warps=cfg["warps"],
        )  # fmt: skip
        pmax, psum, ptgt = parts[0], parts[1], parts[2]
        gmax = pmax.max(dim=0).values
        lse = gmax + torch.log((psum * torch.exp(pmax - gmax)).sum(dim=0))
        valid = tgt != ignore_index
        logp = torch.where(valid, ptgt.sum(dim=0) - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, tgt, valid, bias, lse)
        ctx.cfg, ctx.inv_t, ctx.prec = cfg, inv_t, prec
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tgt, valid, bias, lse = ctx.saved_tensors
        cfg, inv_t = ctx.cfg, ctx.inv_t
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        scale = (torch.where(valid, grad_out.float(), torch.zeros_like(lse)) * inv_t).contiguous()
        dh = torch.zeros(rows, dim, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros(vocab, dim, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        dummy = lse
        _bwd_kernel[(cfg["m_blocks"], cfg["splits"])](
            hidden, weight, bias if bias is not None else hidden, tgt, lse, scale,
            dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
            rows, vocab, dim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_t, cfg["tps"],
            HAS_BIAS=bias is not None, NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b,
            PRECISION=ctx.prec,
            BLOCK_M=cfg["bm"], BLOCK_V=cfg["bv"], BLOCK_K=cfg["bk"], num_warps=cfg["warps"],
        )  # fmt: skip
        return (
            dh.to(hidden.dtype) if need_h else None,
            dw.to(weight.dtype) if need_w else None,
            None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def fused_linear_logprob_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    block_v: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton implementation of ``latentr3_fast.ops.fused_linear_logprob``.

    Args:
        hidden: ``[M, d]``; weight: ``[V, d]``; targets: ``[M]`` int64; bias: optional ``[V]``.
        block_v, block_k, splits: override the tile sizes (powers of two >= 16) and the
            number of vocabulary splits (tests and tuning).

    Returns:
        ``[M]`` fp32 log-probs, 0 at ``ignore_index`` rows; differentiable wrt hidden/weight/bias.
    """
    check_logprob_args(hidden, weight, targets, bias, ignore_index, temperature)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    return _TritonLinearLogprob.apply(
        hidden, weight, targets, bias, int(ignore_index), float(temperature),
        dict(block_v=block_v, block_k=block_k, splits=splits),
    )  # fmt: skip

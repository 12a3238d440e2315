"""Triton fused LM head + log-softmax + gather (forward and backward): the per-token
log-probabilities of the SFT loss (paper Sec. 3.2.1, Eq. 4), the perplexity reward (Eq. 6) and
the GRPO ratio (Eq. 8).

Forward (``_fwd_kernel``): a grid of (row block, vocabulary split) programs; each walks its V
tiles, computes the ``[BLOCK_ROWS, BLOCK_VOCAB]`` logits tile as a loop over d of ``tl.dot``
with an fp32 accumulator, and keeps an online (max, sum-exp) per row plus the target logit.
The per-split partials ``[S, M]`` are merged by a few tiny torch ops. The ``[M, V]`` logits
never exist.

Backward, deterministic and without atomics: rows are processed in chunks; for each chunk
``_grad_kernel`` recomputes the logits tiles from the saved log-sum-exp and writes
``g = (onehot - softmax) * grad_out / temperature`` in the compute dtype into a ``[chunk, V]``
buffer (every program owns its tile: plain stores). Then ``dH = g @ W`` and, only when the head
trains, ``dW += g.T @ H`` and ``db += sum(g)`` are ordinary GEMMs/reductions (the approach of
Liger-Kernel's fused linear cross-entropy). Memory is bounded by the chunk buffer
(``BWD_CHUNK_ELEMENTS``), not by M; results do not depend on launch order.

Precision: bf16/fp16 operands go into ``tl.dot`` in their own dtype (tensor cores at full
rate) with fp32 accumulation; fp32 operands use IEEE dots (exact path). ``hidden`` is converted
to ``weight.dtype`` on the host (the small tensor, never the ``[V, d]`` head), like the chunked
torch path. Only under ``TRITON_INTERPRET=1`` are loads converted to fp32 (``UPCAST``), because
the interpreter computes bf16 wrongly; a GPU never does that conversion. Softmax math is fp32.

Configs: ``CONFIGS[arch][family][bucket]`` lists the (BLOCK_ROWS, BLOCK_VOCAB, BLOCK_DIM,
warps, stages) that the dispatcher can pick; the first entry is the default, the others are
searched only with ``LATENTR3_AUTOTUNE=1`` (``triton.autotune``, keyed on V, d and dtype). Every
entry is compiled for sm_80/sm_90 by ``tests/kernels/test_kernel_codegen.py``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_logprob_args, interpreting
from .logprob_configs import CONFIGS, KernelConfig, arch_class, family, row_bucket

# Elements of the backward's per-chunk gradient buffer: 2**26 (128 MiB in bf16, about the fp32
# logits of 220 rows at V=151,936). That gives 384-row chunks at Qwen's vocabulary: GEMMs large
# enough for the tensor cores, memory far below [M, V] once M passes a few hundred rows.
BWD_CHUNK_ELEMENTS = 1 << 26
AUTOTUNE_ENV = "LATENTR3_AUTOTUNE"


# The interpreter pays per op, not per element: few, large tiles.
_INTERPRET_BLOCK_VOCAB = 512


@triton.jit
def _logits_tile(
    HIDDEN,
    WEIGHT,
    BIAS,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_VOCAB: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # int64 row offsets: rows * d and V * d pass 2**31 at real sizes (16k rows x 151,936 x 1536).
    h_ptr = HIDDEN + rows.to(tl.int64)[:, None] * stride_hm
    w_ptr = WEIGHT + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_ROWS, BLOCK_VOCAB), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_DIM):
        ks = k0 + tl.arange(0, BLOCK_DIM)
        k_ok = ks < D
        h_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = col_ok[None, :] & k_ok[:, None]
        h = tl.load(h_ptr + ks[None, :] * stride_hk, mask=h_mask, other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        if UPCAST:  # interpreter only: its bf16 arithmetic is wrong
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _fwd_kernel(
    HIDDEN,
    WEIGHT,
    BIAS,
    TARGETS,
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
    inv_temperature,
    num_splits,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_VOCAB: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    target_ids = tl.load(TARGETS + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_VOCAB)
    per_split = tl.cdiv(n_tiles, num_splits)
    tile0 = pid_s * per_split
    tile1 = tl.minimum(tile0 + per_split, n_tiles)
    # Every visited tile holds >= 1 real column, so run_max is finite after it. A split with no
    # tile stores (-inf, 0, 0), which the host merge turns into a zero contribution.
    for tile in range(tile0, tile1):
        cols = tile * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)
        col_ok = cols < V
        z = _logits_tile(
            HIDDEN, WEIGHT, BIAS, rows, cols, row_ok, col_ok, D,
            stride_hm, stride_hk, stride_wv, stride_wk, inv_temperature,
            HAS_BIAS, PRECISION, UPCAST, BLOCK_ROWS, BLOCK_VOCAB, BLOCK_DIM,
        )  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        target_logit += tl.sum(tl.where(cols[None, :] == target_ids[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        run_max = m_new
    out = pid_s * M + rows
    tl.store(PART_MAX + out, run_max, mask=row_ok)
    tl.store(PART_SUM + out, run_sum, mask=row_ok)
    tl.store(PART_TGT + out, target_logit, mask=row_ok)


@triton.jit
def _grad_kernel(
    HIDDEN,
    WEIGHT,
    BIAS,
    TARGETS,
    LSE,
    SCALE,
    GRAD,
    M,
    V,
    D,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_gm,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_VOCAB: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """One ``[BLOCK_ROWS, BLOCK_VOCAB]`` tile of ``g = (onehot - softmax) * scale`` of a chunk."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)
    row_ok = rows < M
    col_ok = cols < V
    target_ids = tl.load(TARGETS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)  # grad_out / temperature, 0 on ignored
    z = _logits_tile(
        HIDDEN, WEIGHT, BIAS, rows, cols, row_ok, col_ok, D,
        stride_hm, stride_hk, stride_wv, stride_wk, inv_temperature,
        HAS_BIAS, PRECISION, UPCAST, BLOCK_ROWS, BLOCK_VOCAB, BLOCK_DIM,
    )  # fmt: skip
    p = tl.exp(z - lse[:, None])
    g = (tl.where(cols[None, :] == target_ids[:, None], 1.0, 0.0) - p) * scale[:, None]
    dst = GRAD + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
    tl.store(dst, g.to(GRAD.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side: configs, dispatch, autograd.


@functools.lru_cache(maxsize=8)
def _device_info(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return arch_class((props.major, props.minor)), props.multi_processor_count


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


_TUNERS: dict[tuple[str, str, str, int], object] = {}


def autotuned_choices() -> dict[str, str]:
    """The config each autotuner picked so far (``LATENTR3_AUTOTUNE=1``), for the bench logs."""
    return {"/".join(map(str, k)): str(getattr(t, "best_config", None)) for k, t in _TUNERS.items()}


def _tuned(kernel_name: str, arch: str, fam: str, bucket: int):
    """``triton.autotune`` over the bucket's configs (keyed on V, d and the tensors' dtypes)."""
    key = (kernel_name, arch, fam, bucket)
    if key in _TUNERS:
        return _TUNERS[key]
    kernel = {"fwd": _fwd_kernel, "grad": _grad_kernel}[kernel_name]
    configs = [
        triton.Config(
            dict(BLOCK_ROWS=c.block_rows, BLOCK_VOCAB=c.block_vocab, BLOCK_DIM=c.block_dim),
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in CONFIGS[arch][fam][bucket]
    ]
    _TUNERS[key] = triton.autotune(configs=configs, key=["V", "D"])(kernel)
    return _TUNERS[key]


class _Plan(NamedTuple):
    kernel_args: dict  # constexpr/meta kwargs for a plain launch; {} when autotuned
    block_rows: int
    block_vocab: int  # the smallest BLOCK_VOCAB the launch can use (sizes the vocabulary splits)
    autotuned: bool
    arch: str
    fam: str
    bucket: int
    sms: int


def _plan(rows: int, dim: int, dtype: torch.dtype, device: torch.device, overrides: dict) -> _Plan:
    if interpreting() or device.type != "cuda":
        block_rows = max(16, min(64, triton.next_power_of_2(max(1, rows))))
        block_dim = max(16, min(128, triton.next_power_of_2(dim)))
        cfg = KernelConfig(block_rows, _INTERPRET_BLOCK_VOCAB, block_dim, 4, 1)
        arch, sms = "interpret", 1
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        arch, sms = _device_info(index)
        cfg = CONFIGS[arch][family(dtype)][row_bucket(rows)][0]
    block_vocab = overrides.get("block_vocab") or cfg.block_vocab
    block_dim = overrides.get("block_dim") or cfg.block_dim
    # Explicit tile/split overrides (tests, experiments) bypass both the table and the autotuner.
    forced = any(overrides.get(k) for k in ("block_vocab", "block_dim", "splits"))
    tuned = arch != "interpret" and _autotune_enabled() and not forced
    args = {} if tuned else dict(BLOCK_ROWS=cfg.block_rows, BLOCK_VOCAB=block_vocab,
                                 BLOCK_DIM=block_dim, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)  # fmt: skip
    fam, bucket = family(dtype), row_bucket(rows)
    if tuned:
        block_vocab = min(c.block_vocab for c in CONFIGS[arch][fam][bucket])
    return _Plan(args, cfg.block_rows, block_vocab, tuned, arch, fam, bucket, sms)


def _num_splits(rows: int, vocab: int, plan: _Plan, splits: int | None) -> int:
    tiles = triton.cdiv(vocab, plan.block_vocab)
    if splits is None:
        if plan.arch == "interpret":
            return 1
        splits = max(1, (4 * plan.sms) // triton.cdiv(rows, plan.block_rows))  # ~4 waves
    return max(1, min(tiles, int(splits)))


def _launch(name: str, plan: _Plan, grid_rows: int, grid_cols, *args, **const) -> None:
    if plan.autotuned:
        kern = _tuned(name, plan.arch, plan.fam, plan.bucket)
        grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_ROWS"]), grid_cols(meta))  # noqa: E731
        kern[grid](*args, **const)
    else:
        kern = {"fwd": _fwd_kernel, "grad": _grad_kernel}[name]
        meta = plan.kernel_args
        kern[(triton.cdiv(grid_rows, meta["BLOCK_ROWS"]), grid_cols(meta))](*args, **const, **meta)


# fp32 operands: IEEE dots (exact; TF32 would cost ~1e-3 relative). bf16/fp16 operands ignore
# the setting and use their own tensor-core instructions.
PRECISION = "ieee"


class _TritonLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, overrides):
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        plan = _plan(rows, dim, weight.dtype, hidden.device, overrides)
        n_splits = _num_splits(rows, vocab, plan, overrides.get("splits"))
        inv_temperature = 1.0 / float(temperature)
        h = hidden.to(weight.dtype)  # GEMM dtype = the head's; convert the small tensor only
        target_ids = targets.to(torch.int64).contiguous()
        parts = torch.empty(3, n_splits, rows, dtype=torch.float32, device=hidden.device)
        const = dict(HAS_BIAS=bias is not None, PRECISION=PRECISION,
                     UPCAST=interpreting())  # fmt: skip
        _launch(
            "fwd", plan, rows, lambda meta: n_splits,
            h, weight, bias if bias is not None else h, target_ids, parts[0], parts[1], parts[2],
            rows, vocab, dim, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            inv_temperature, n_splits, **const,
        )  # fmt: skip
        pmax, psum, ptgt = parts[0], parts[1], parts[2]
        gmax = pmax.max(dim=0).values
        lse = gmax + torch.log((psum * torch.exp(pmax - gmax)).sum(dim=0))
        valid = target_ids != ignore_index
        logp = torch.where(valid, ptgt.sum(dim=0) - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, target_ids, valid, bias, lse)
        ctx.inv_temperature, ctx.overrides = inv_temperature, overrides
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        hidden, weight, target_ids, valid, bias, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        dh, dw, db = grad_from_lse(
            hidden, weight, target_ids, valid, bias, lse, grad_out, ctx.inv_temperature,
            need_h=need_h, need_w=need_w, need_b=need_b,
            chunk_rows=ctx.overrides.get("chunk_rows"), overrides=ctx.overrides,
        )  # fmt: skip
        return dh, dw, None, db, None, None, None


def grad_from_lse(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    inv_temperature: float,
    *,
    need_h: bool = True,
    need_w: bool = False,
    need_b: bool = False,
    chunk_rows: int | None = None,
    overrides: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_out * logp)`` from the forward's per-row log-sum-exp.

    Args:
        hidden ``[M, d]``, weight ``[V, d]``, targets ``[M]`` int64, valid ``[M]`` bool,
        bias ``[V]`` or None, lse ``[M]`` fp32, grad_out ``[M]``.
        chunk_rows: rows per chunk of the ``[chunk, V]`` gradient buffer (default: as many as
            fit ``BWD_CHUNK_ELEMENTS``, a multiple of 64).

    Returns:
        ``(dH [M, d] in hidden.dtype, dW [V, d] in weight.dtype, db [V])``, None where not
        needed. No atomics: the result is the same on every run.
    """
    overrides = overrides or {}
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    compute_dtype = weight.dtype
    h_all = hidden.to(compute_dtype)
    scale = torch.where(valid, grad_out.float(), torch.zeros_like(lse)) * inv_temperature
    scale = scale.contiguous()
    if chunk_rows is None:
        chunk_rows = max(64, (BWD_CHUNK_ELEMENTS // max(1, vocab)) // 64 * 64)
    chunk = max(1, min(rows, int(chunk_rows)))
    plan = _plan(chunk, dim, compute_dtype, hidden.device, overrides)
    buf = torch.empty(chunk, vocab, dtype=compute_dtype, device=hidden.device)
    dh = torch.empty(rows, dim, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw32 = torch.zeros(vocab, dim, dtype=torch.float32, device=weight.device) if need_w else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    const = dict(HAS_BIAS=bias is not None, PRECISION=PRECISION, UPCAST=interpreting())
    for m0 in range(0, rows, chunk):
        m1 = min(rows, m0 + chunk)
        h = h_all[m0:m1]
        g = buf[: m1 - m0]
        _launch(
            "grad", plan, m1 - m0,
            lambda meta: triton.cdiv(vocab, meta["BLOCK_VOCAB"]),
            h, weight, bias if bias is not None else h, targets[m0:m1], lse[m0:m1],
            scale[m0:m1], g, m1 - m0, vocab, dim,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), g.stride(0),
            inv_temperature,
            **const,
        )  # fmt: skip
        if need_h:
            dh[m0:m1] = g @ weight  # cuBLAS/CPU GEMM in the compute dtype, fp32 accumulation
        if need_w:
            dw32 += (g.T @ h).float()
        if need_b:
            db32 += g.float().sum(dim=0)
    dw = dw32.to(weight.dtype) if need_w else None
    db = db32.to(bias.dtype) if need_b else None
    return dh, dw, db


def fused_linear_logprob_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    block_vocab: int | None = None,
    block_dim: int | None = None,
    splits: int | None = None,
    chunk_rows: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``latentr3_fast.ops.fused_linear_logprob``.

    Args:
        hidden: ``[M, d]``; weight: ``[V, d]``; targets: ``[M]`` int64; bias: optional ``[V]``.
        block_vocab, block_dim, splits: override the tile sizes (powers of two >= 16) and the
            number of vocabulary splits of the forward (tests and tuning).
        chunk_rows: rows per chunk of the backward's ``[chunk, V]`` gradient buffer.
        return_lse: also return the per-row log-sum-exp of the (temperature-scaled) logits.

    Returns:
        ``[M]`` fp32 log-probs, 0 at ``ignore_index`` rows; differentiable wrt hidden/weight/bias.
        With ``return_lse``: ``(logp, lse)``, ``lse`` ``[M]`` fp32 for every row (ignored rows
        too), without gradient (entropy or z-loss terms can reuse it without a second pass).
    """
    check_logprob_args(hidden, weight, targets, bias, ignore_index, temperature)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logp = empty + 0.0 * hidden.sum()
        return (logp, empty) if return_lse else logp
    logp, lse = _TritonLinearLogprob.apply(
        hidden, weight, targets, bias, int(ignore_index), float(temperature),
        dict(block_vocab=block_vocab, block_dim=block_dim, splits=splits, chunk_rows=chunk_rows),
    )  # fmt: skip
    return (logp, lse) if return_lse else logp

"""Fused ops vs the naive torch way, at Qwen2.5-1.5B head shapes (d=1536, V=151,665).

naive = full logits + log_softmax + gather (what the reference code does per position).
fused_torch = chunked online-LSE torch path (CPU default); fused_triton = Triton kernel (CUDA).
Each row records time (pytest-benchmark) and the peak extra memory of one call: RSS
high-water delta in a fresh subprocess on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
import torch
from ops_memprobe import make_case, peak_bytes

D, V = 1536, 151_665
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"  # real models run the head in bf16 on GPU
# rows = prompts x target tokens (8 x 16 is the reference GRPO micro-batch of one prompt x G=8)
SHAPES = [(128, "8x16"), (512, "32x16")] + ([(2048, "128x16")] if CUDA else [])
IMPLS = ["naive", "fused_torch"] + (["fused_triton"] if CUDA else [])
ROUNDS = 10 if CUDA else 3


def _sync():
    harness.sync(DEVICE)


def _peak_bytes(impl: str, m: int, passes: str, run) -> int:
    """Peak extra memory of one call: in-process on CUDA (allocator statistics), in a fresh
    process on CPU (RSS high-water mark; no allocator history)."""
    if CUDA:
        return peak_bytes(run, DEVICE)
    probe = Path(__file__).with_name("ops_memprobe.py")
    args = [sys.executable, str(probe), impl, str(m), str(D), str(V), passes, DTYPE]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def _analytic_bytes(impl: str, m: int, passes: str) -> int:
    """Bytes of the dominant temporaries (what the implementation is designed to hold)."""
    from latentr3_fast.ops.logprob import DEFAULT_CHUNK_ELEMENTS

    if impl == "naive":  # fp32 logits + fp32 log_softmax (+ their grads in backward)
        low = 0 if DTYPE == "float32" else m * V * 2
        return m * V * 4 * (2 if passes == "fwd" else 3) + low
    if impl == "fused_torch":
        return min(m, 1024) * min(V, max(1024, DEFAULT_CHUNK_ELEMENTS // min(m, 1024))) * 4
    return 3 * m * 4 * 512  # per-split partial (max, sum, target) rows; splits <= 512


@pytest.mark.parametrize("passes", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[1] for s in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprob(benchmark, bench_record, impl, shape, passes):
    m, layout = shape
    if not CUDA and m > 128 and passes == "fwdbwd":
        pytest.skip("CPU: backward measured at M=128 only (keeps the suite short)")
    run = make_case(impl, m, D, V, passes, DTYPE, DEVICE)

    def call():
        run()
        _sync()

    benchmark.extra_info.update(impl=impl, m=m, passes=passes)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    st = benchmark.stats.stats
    bench_record(
        dict(
            op="linear_logprob",
            impl=impl,
            device=DEVICE,
            dtype=DTYPE,
            m=m,
            layout=layout,
            d=D,
            v=V,
            passes=passes,
            min_s=st.min,
            median_s=st.median,
            rounds=ROUNDS,
            peak_bytes=_peak_bytes(impl, m, passes, run),
            analytic_bytes=_analytic_bytes(impl, m, passes),
        )
    )


EXPAND_IMPLS = ["naive", "torch"] + (["triton"] if CUDA else [])


@pytest.mark.parametrize("impl", EXPAND_IMPLS)
def test_gaussian_expand(benchmark, bench_record, impl):
    from latentr3_fast.ops import gaussian_expand_torch

    p, g, n = 32, 8, 1
    r = torch.randn(p, n, D, device=DEVICE)
    buf = torch.empty(p * g, n + 16, D, device=DEVICE)  # suffix buffer: latents + 16 targets

    if impl == "naive":  # reference style: repeat, randn, add, then copy into the buffer

        def call():
            rep = r.repeat_interleave(g, dim=0).clone()
            eps = torch.randn(p, g - 1, D, device=DEVICE)
            rep.view(p, g, n, D)[:, 1:, 0] += 1.5 * eps
            buf[:, :n] = rep
            _sync()

    elif impl == "torch":

        def call():
            gaussian_expand_torch(r, g, 1.5, out=buf[:, :n])
            _sync()

    else:
        from latentr3_fast.kernels.gaussian_expand import gaussian_expand_triton

        def call():
            gaussian_expand_triton(r, g, 1.5, seed=1, out=buf[:, :n])
            _sync()

    benchmark.pedantic(call, rounds=50, iterations=1, warmup_rounds=2)
    st = benchmark.stats.stats
    bench_record(
        dict(op="gaussian_expand", impl=impl, device=DEVICE, dtype="float32", m=p * g,
             layout=f"{p}x{g}", d=D, v=0, passes="fwd", min_s=st.min, median_s=st.median,
             rounds=50, peak_bytes=None, analytic_bytes=None)
    )  # fmt: skip


@pytest.mark.parametrize("passes", ["fwd", "fwdbwd"])
def test_linear_logprob_interleaved(benchmark, bench_record, passes):
    """naive and fused_torch alternated within each round, so both see the same machine load
    (separate benchmarks minutes apart are skewed by other work on a shared CPU)."""
    m = 128
    fused = "fused_triton" if CUDA else "fused_torch"
    runs = {i: make_case(i, m, D, V, passes, DTYPE, DEVICE) for i in ("naive", fused)}
    times: dict[str, list[float]] = {i: [] for i in runs}

    def pair():
        for impl, run in runs.items():
            t0 = time.perf_counter()
            run()
            _sync()
            times[impl].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = {i: min(ts[1:] if len(ts) > 1 else ts) for i, ts in times.items()}  # drop warm-up
    bench_record(
        dict(op="linear_logprob_interleaved", impl=fused, device=DEVICE, dtype=DTYPE, m=m,
             layout="8x16", d=D, v=V, passes=passes, min_s=best[fused],
             median_s=best["naive"], rounds=ROUNDS, peak_bytes=None, analytic_bytes=None,
             naive_min_s=best["naive"], ratio=best[fused] / best["naive"])
    )  # fmt: skip

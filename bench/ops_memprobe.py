"""Peak-memory probe for one fused-log-prob case, run in a fresh subprocess.

Measured by ``harness.PeakMemory``: on CPU the RSS high-water mark above the RSS before (the
extra resident memory the op needed at its peak), on CUDA ``max_memory_allocated`` above the
memory held before the call.

Usage: python bench/ops_memprobe.py IMPL M D V PASS DTYPE   (prints one JSON line)
"""

from __future__ import annotations

import json
import sys

import harness
import torch


def make_case(impl: str, m: int, d: int, v: int, passes: str, dtype: str, device: str):
    """Inputs and a zero-argument callable running the case (shared with the benchmark)."""
    from reference_ops import naive_linear_logprob

    from latentr3_fast.ops import fused_linear_logprob_torch

    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(v, d, generator=gen, device=device) / d**0.5).to(dt)
    hidden = torch.randn(m, d, generator=gen, device=device).to(dt)
    targets = torch.randint(0, v, (m,), generator=gen, device=device)
    if impl == "naive":
        fn = naive_linear_logprob
    elif impl == "fused_torch":
        fn = fused_linear_logprob_torch
    elif impl == "fused_triton":
        from latentr3_fast.kernels.linear_logprob import fused_linear_logprob_triton as fn
    else:
        raise SystemExit(f"unknown impl {impl}")
    if passes == "fwd":

        def run():
            with torch.no_grad():
                return fn(hidden, weight, targets)
    else:  # forward + backward with a frozen head: only dH
        hidden.requires_grad_()

        def run():
            hidden.grad = None
            fn(hidden, weight, targets).sum().backward()
            return hidden.grad

    return run


def peak_bytes(run, device: str) -> int:
    """Peak extra memory of one ``run()`` (:class:`harness.PeakMemory`)."""
    if device != "cuda":
        # Warm up BLAS/OpenMP thread buffers on a tiny GEMM so they are not counted.
        torch.randn(64, 256) @ torch.randn(256, 4096)
    with harness.PeakMemory(device) as mem:
        run()
    return mem.bytes


def main() -> None:
    impl, m, d, v, passes, dtype = sys.argv[1:7]
    device = "cuda" if impl == "fused_triton" or "--cuda" in sys.argv else "cpu"
    run = make_case(impl, int(m), int(d), int(v), passes, dtype, device)
    print(json.dumps({"peak_bytes": int(peak_bytes(run, device))}))


if __name__ == "__main__":
    main()

"""Peak-memory probe for one fused-log-prob case, run in a fresh subprocess.

CPU: resets the process's RSS high-water mark (``/proc/self/clear_refs``), runs the op once and
reports ``VmHWM - VmRSS(before)``: the extra resident memory the op needed at its peak.
CUDA: ``torch.cuda.max_memory_allocated`` minus the memory held before the call.

Usage: python bench/ops_memprobe.py IMPL M D V PASS DTYPE   (prints one JSON line)
"""

from __future__ import annotations

import json
import sys

import torch


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


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


def cuda_peak_bytes(run) -> int:
    """Peak extra CUDA memory of one ``run()`` (the caching allocator's own accounting)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    impl, m, d, v, passes, dtype = sys.argv[1:7]
    device = "cuda" if impl == "fused_triton" or "--cuda" in sys.argv else "cpu"
    run = make_case(impl, int(m), int(d), int(v), passes, dtype, device)
    if device == "cuda":
        peak = cuda_peak_bytes(run)
    else:
        # Warm up BLAS/OpenMP thread buffers on a tiny GEMM so they are not counted.
        torch.randn(64, 256) @ torch.randn(256, 4096)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        run()
        peak = _status("VmHWM") - before
    print(json.dumps({"peak_bytes": int(peak)}))


if __name__ == "__main__":
    main()

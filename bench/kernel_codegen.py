"""Compile every Triton kernel of the package for real GPUs, ahead of time, on any machine.

For each kernel x every config the dispatcher or autotuner can launch x {fp32, bf16, fp16} x
{sm_80, sm_90}: ``triton.compile`` (no GPU needed) with the argument specialization the
launcher would derive from real arguments (Qwen2.5-1.5B sizes: d=1536, V=151,936), then the
wheel's ``ptxas -v`` with Triton's own flags. Reports the matrix-instruction types (``mma.sync``
/ ``wgmma`` and their operand types), FMA-only dots, vectorised global loads, registers, spill
bytes and shared memory.

Usage: ``python bench/kernel_codegen.py [--json PATH] [--markdown PATH] [--jobs N]
[--only fwd,grad,expand]``. Runs with ``TRITON_INTERPRET=0`` in a fresh, throw-away Triton
cache, so nothing is reused between runs. Used by ``tests/kernels/test_kernel_codegen.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHES = {"sm80": 80, "sm90": 90}
DTYPES = ("fp32", "bf16", "fp16")
DIM, VOCAB, ROWS = 1536, 151_936, 1000  # Qwen2.5-1.5B head; rows % 16 != 0 like real batches
# Shared memory per block the launch may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166_912, 90: 232_448}


def _setup_env(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, silenced
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _cases(only: set[str]) -> list[dict]:
    from latentr3_fast.kernels import gaussian_expand as ge
    from latentr3_fast.kernels import logprob_configs as lc

    cases = []
    for (arch, fam), table in lc.reachable_configs().items():
        for cfg in table:
            for kernel in ("fwd", "grad"):
                if kernel not in only:
                    continue
                for dtype in ("fp32",) if fam == "fp32" else ("bf16", "fp16"):
                    # The bias variant adds one [BLOCK_VOCAB] load after the K loop; compiled for
                    # bf16 (the training dtype) to keep the test fast.
                    for bias in (False, True) if dtype == "bf16" else (False,):
                        cases.append(dict(kernel=kernel, arch=arch, cfg=list(cfg), dtype=dtype,
                                          bias=bias))  # fmt: skip
    if "expand" in only:
        for arch in ARCHES:
            for block in ge.reachable_blocks():
                for dtype in DTYPES:
                    for has_noise in (False, True):
                        cases.append(dict(kernel="expand", arch=arch, cfg=[block], dtype=dtype,
                                          bias=has_noise))  # fmt: skip
    return cases


def _specialize(fn, args: dict, constexprs: dict):
    """(signature, constexprs, attrs) as the launcher derives them from real arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(BaseBackend, args[name], False, True, True)
        if kind == "constexpr":  # ints equal to 1 become constants
            signature[name] = "constexpr"
            consts[name] = spec
            continue
        signature[name] = kind
        if spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, consts, attrs


def _tensor(dtype: str, *shape: int):
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.empty(shape, dtype=dt) if dtype in DTYPES else torch.empty(shape, dtype=dtype)


def _kernel_and_args(case: dict):
    import torch

    from latentr3_fast.kernels import gaussian_expand as ge
    from latentr3_fast.kernels import linear_logprob as ll

    dtype = case["dtype"]
    f32 = torch.empty(4, dtype=torch.float32)
    if case["kernel"] == "expand":
        (block,) = case["cfg"]
        r = _tensor(dtype, 4)
        args = dict(R=r, NOISE=f32, OUT=r, seed=12345, sigma=1.5, num_generations=8, D=DIM,
                    stride_rp=DIM, stride_rn=DIM, stride_rd=1, stride_op=5 * DIM,
                    stride_on=DIM, stride_od=1)  # fmt: skip
        const = dict(HAS_NOISE=case["bias"], BLOCK_D=block)
        return ge._expand_kernel, args, const, 4, 1
    block_rows, block_vocab, block_dim, warps, stages = case["cfg"]
    h = _tensor(dtype, 4)
    tgt = torch.empty(4, dtype=torch.int64)
    common = dict(HIDDEN=h, WEIGHT=h, BIAS=h, TARGETS=tgt, M=ROWS, V=VOCAB, D=DIM, stride_hm=DIM,
                  stride_hk=1, stride_wv=DIM, stride_wk=1, inv_temperature=1.25)  # fmt: skip
    const = dict(HAS_BIAS=case["bias"], PRECISION=ll.PRECISION, UPCAST=False,
                 BLOCK_ROWS=block_rows, BLOCK_VOCAB=block_vocab, BLOCK_DIM=block_dim)  # fmt: skip
    if case["kernel"] == "fwd":
        args = dict(common, PART_MAX=f32, PART_SUM=f32, PART_TGT=f32, num_splits=7)
        return ll._fwd_kernel, args, const, warps, stages
    args = dict(common, LSE=f32, SCALE=f32, GRAD=h, stride_gm=VOCAB)
    return ll._grad_kernel, args, const, warps, stages


def _ptxas_report(ptx: str, cap: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(cap)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(
        registers=int(regs.group(1)) if regs else -1,
        spill_stores=int(spill.group(1)) if spill else -1,
        spill_loads=int(spill.group(2)) if spill else -1,
        stack=int(stack.group(1)) if stack else -1,
    )


def _instructions(ptx: str) -> dict:
    mma = sorted(set(re.findall(r"\b(mma\.sync\.aligned\.\S+?|wgmma\.mma_async\.\S+?)[\s;]", ptx)))
    # Widest global load in bits: ld.global[.nc...][.vN].{b,u,s,f}BITS
    loads = re.findall(r"\bld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bufs](\d+)\b", ptx)
    return dict(
        mma=mma,
        fma_f32=len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        ld_global_bits=max((int(v or 1) * int(b) for v, b in loads), default=0),
    )


def compile_case(case: dict) -> dict:
    """Compile one case for its arch; return the case with its code-generation facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, const, warps, stages = _kernel_and_args(case)
    cap = ARCHES[case["arch"]]
    signature, consts, attrs = _specialize(fn, args, const)
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
    ptx = compiled.asm["ptx"]
    out = dict(case, seconds=round(time.perf_counter() - t0, 2), shared=compiled.metadata.shared,
               smem_limit=SMEM_LIMIT[cap])  # fmt: skip
    out.update(_instructions(ptx))
    out.update(_ptxas_report(ptx, cap))
    return out


def _worker(case: dict) -> dict:
    try:
        return compile_case(case)
    except Exception as exc:  # report the failure in the table instead of dying
        return dict(case, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _init(cache_dir: str) -> None:
    _setup_env(cache_dir)
    import torch

    torch.set_num_threads(1)


def markdown(rows: list[dict]) -> str:
    """The results as one Markdown table."""
    import triton

    head = (f"Ahead-of-time compilation (triton {triton.__version__}, no GPU), d={DIM}, "
            f"V={VOCAB}.\n\n")  # fmt: skip
    lines = ["| kernel | arch | config (rows,vocab,dim,warps,stages / BLOCK_D) | dtype "
             "| bias/noise | matrix instructions | fma.f32 | widest ld (bits) | regs | spill st/ld "
             "| smem | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mma = ", ".join(m.replace("mma_async.sync.aligned.", "").replace("sync.aligned.", "")
                        for m in r.get("mma", [])) or "-"  # fmt: skip
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {','.join(map(str, r['cfg']))} | {r['dtype']} "
            f"| {r['bias']} | {mma} | {r.get('fma_f32', '')} | {r.get('ld_global_bits', '')} "
            f"| {r.get('registers', '')} | {r.get('spill_stores', '')}/{r.get('spill_loads', '')} "
            f"| {r.get('shared', '')} | {r.get('error', '')} |"
        )
    return head + "\n".join(lines) + "\n"


def run(only: set[str], jobs: int) -> list[dict]:
    """Compile every case (``jobs`` processes) in a fresh temporary Triton cache."""
    with tempfile.TemporaryDirectory(prefix="triton-codegen-") as cache:
        _setup_env(cache)
        cases = _cases(only)
        if jobs <= 1:
            _init(cache)
            return [_worker(c) for c in cases]
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(cache,)) as pool:
            return list(pool.map(_worker, cases))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the Markdown table here")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--only", default="fwd,grad,expand", help="kernels: fwd,grad,expand")
    args = ap.parse_args(argv)
    only = {k.strip() for k in args.only.split(",") if k.strip()}
    if not only <= {"fwd", "grad", "expand"}:
        ap.error(f"--only: unknown kernel(s) {sorted(only - {'fwd', 'grad', 'expand'})}")
    t0 = time.perf_counter()
    rows = run(only, max(1, args.jobs))
    table = markdown(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    print(f"{len(rows)} compilations in {time.perf_counter() - t0:.1f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

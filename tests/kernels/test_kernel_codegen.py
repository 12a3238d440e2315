"""What a real GPU would run: every kernel x reachable config x dtype, compiled for sm_80/sm_90.

``bench/kernel_codegen.py`` compiles ahead of time (no GPU, ``TRITON_INTERPRET=0`` in a
subprocess, fresh Triton cache) and reports PTX instruction types and ``ptxas -v`` facts. This
test asserts what the hardware needs: bf16/fp16 operands on bf16/fp16 tensor-core instructions
(never TF32), Hopper's ``wgmma`` for 64-row tiles on sm_90, the exact FMA path for fp32, zero
spill bytes, shared memory within the device limit, and vectorised loads in the memory-bound
expansion kernel. A kernel that no longer compiles for a GPU fails here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # ~1 minute of CPU on 2 cores


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path_factory.mktemp("codegen") / "codegen.json"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_codegen.py"), "--jobs", "2",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    print(proc.stdout[-20000:])  # the table, visible with -s or on failure
    assert out.is_file(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_case_compiles(rows):
    errors = [(r["kernel"], r["arch"], r["cfg"], r["dtype"], r["error"])
              for r in rows if "error" in r]  # fmt: skip
    assert not errors, errors


def test_every_reachable_config_is_covered(rows):
    from latentr3_fast.kernels import gaussian_expand as ge
    from latentr3_fast.kernels import logprob_configs as lc

    for (arch, fam), configs in lc.reachable_configs().items():
        dtypes = {"fp32"} if fam == "fp32" else {"bf16", "fp16"}
        for kernel in ("fwd", "grad"):
            for cfg in configs:
                key = (kernel, arch, cfg)
                got = {r["dtype"] for r in rows
                       if (r["kernel"], r["arch"], tuple(r["cfg"])) == key}  # fmt: skip
                assert got == dtypes, (kernel, arch, cfg, got)
    for arch in ("sm80", "sm90"):
        for block in ge.reachable_blocks():
            got = {(r["dtype"], r["bias"]) for r in rows
                   if (r["kernel"], r["arch"], r["cfg"]) == ("expand", arch, [block])}  # fmt: skip
            assert got == {(d, n) for d in ("fp32", "bf16", "fp16") for n in (False, True)}
    # the bias variant of the log-prob kernels, on the training dtype
    assert any(r["bias"] for r in rows if r["kernel"] == "fwd" and r["dtype"] == "bf16")


def test_tensor_core_instruction_types(rows):
    for r in rows:
        if r["kernel"] == "expand" or "error" in r:
            continue
        mma, where = r["mma"], (r["kernel"], r["arch"], r["cfg"], r["dtype"])
        assert not any("tf32" in m for m in mma), where
        if r["dtype"] == "fp32":  # exact path: IEEE FMA dots, no tensor-core rounding
            assert mma == [] and r["fma_f32"] > 0, where
            continue
        ptx_type = {"bf16": "bf16", "fp16": "f16"}[r["dtype"]]
        operand = f".{ptx_type}.{ptx_type}"
        assert mma and all(operand in m for m in mma), where
        if r["arch"] == "sm90" and r["cfg"][0] == 64:  # a full warpgroup tile: Hopper's wgmma
            assert all(m.startswith("wgmma") for m in mma), where
        else:
            assert all(m.startswith("mma.sync") for m in mma), where


def test_zero_spills_and_shared_memory_fits(rows):
    for r in rows:
        if "error" in r:
            continue
        where = (r["kernel"], r["arch"], r["cfg"], r["dtype"], r["bias"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (where, r["registers"])
        assert 0 < r["registers"] <= 255, where
        assert r["shared"] <= r["smem_limit"], where


def test_expand_loads_are_vectorised(rows):
    bits = {"fp32": 32, "bf16": 16, "fp16": 16}
    for r in (r for r in rows if r["kernel"] == "expand" and "error" not in r):
        per_thread = r["cfg"][0] // (32 * 4)  # elements per thread at 4 warps
        want = min(128, per_thread * bits[r["dtype"]])
        assert r["ld_global_bits"] >= want, (r["arch"], r["cfg"], r["dtype"], r["ld_global_bits"])

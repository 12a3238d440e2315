#!/usr/bin/env bash
# One prepared GPU run (one GPU, at most ~8 minutes; each step has its own time limit):
#   0. install the package offline (bench/gpu_install.sh: pip install --no-build-isolation
#      --no-deps --no-index -e ., else an in-place build; needs torch, triton, transformers,
#      pybind11, cmake; no network);
#   1. the kernel + ops tests on real CUDA (TRITON_INTERPRET=0, real Triton kernels);
#   2. fused log-prob fwd / fwd+bwd / fwd+bwd+dW at Qwen2.5-1.5B head sizes (d=1536,
#      V=151,936, M = 1k..16k rows, bf16): Triton vs the chunked torch path vs a Liger-style
#      chunked reference (bench/bench_logprob.py), default configs, then once more with the
#      autotuner (LATENTR3_AUTOTUNE=1) to record which config wins;
#   3. one GRPO step, one SFT step, the drop-in reward: Qwen2.5-1.5B-shaped random backbone,
#      bf16, SDPA, ours vs the reference-style paths (bench_grpo/bench_sft/bench_reward);
#   4. constrained beam search vs Hugging Face generate (bench_decode).
# Writes logs, JSON and Markdown to $OUT (default bench/results/gpu_check/); the summary is
# gpu_check.json + gpu_check.md. Exit status: 0 when every step passed.
#
#   bench/gpu_check.sh            # on the GPU machine
#   bench/gpu_check.sh --dry-run  # the same steps, tiny shapes, CPU + Triton interpreter, no
#                                 # install (CI runs this, so no GPU minute is lost to a typo)
set -uo pipefail
# The whole script is one function, parsed before it runs: editing this file during a run
# cannot change the running steps.
main() {
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
    esac
done
# Default output: a fresh directory (never overwrites earlier results); a temporary one for
# dry runs.
if [ -n "${OUT:-}" ]; then
    OUT_DIR="$OUT"
elif [ "$DRY" -eq 1 ]; then
    OUT_DIR="$(mktemp -d -t gpu_check_dry.XXXXXX)"
else
    OUT_DIR="bench/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1

# step NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log, record the status.
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

if [ "$DRY" -eq 1 ]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    DEV=cpu
    step install 60 bash bench/gpu_install.sh --check
    # A subset here (the full directories run in CI's own pytest run anyway).
    step tests 300 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_linear_logprob.py \
        tests/ops/test_ops_logprob.py -k "vocab_splits or deterministic or row_chunks" \
        --junitxml="$OUT_DIR/tests.xml"
    step logprob 120 python bench/bench_logprob.py --dry-run --out "$OUT_DIR/bench_logprob.json"
    step logprob_autotune 120 env LATENTR3_AUTOTUNE=1 python bench/bench_logprob.py --dry-run \
        --modes fwd+bwd --variants triton --out "$OUT_DIR/bench_logprob_autotune.json"
    step grpo 240 python bench/bench_grpo.py --device cpu --preset tiny --dtype fp32 --attn sdpa \
        --prompts 2 --micro 2 --G 4 --prompt-len 24 --target-len 5 --repeats 1 --variants keep_graph,reference \
        --out "$OUT_DIR/bench_grpo.json"
    step sft 180 python bench/bench_sft.py --device cpu --preset tiny --dtype fp32 --attn sdpa \
        --batch 2 --prompt-len 24 --target-len 5 --warmup 0 --reps 1 --threads 1 --out "$OUT_DIR/bench_sft.json"
    step reward 180 python bench/bench_reward.py --device cpu --dtype fp32 --hidden 64 --layers 1 \
        --heads 4 --kv-heads 2 --inter 128 --grad --vocab 1000 --prompt-len 32 --answer-len 4 --generations 4 --repeats 1 --threads 1 \
        --variants fused,plain
    step decode 240 python bench/bench_decode.py --device cpu --rows 4 --batch 2 --beams 3 \
        --latency-users 2
else
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible to torch (use --dry-run on CPU)" \
            | tee "$OUT_DIR/gpu_check.log"
        exit 2
    fi
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
    export TRITON_INTERPRET=0
    DEV=cuda
    # Limits sum to 470 s: the whole run stays under 8 minutes.
    step install 75 bash bench/gpu_install.sh
    # (the CPU-only code-generation check and the dry run itself are not GPU work)
    step tests 100 python -m pytest -q -p no:cacheprovider tests/kernels tests/ops \
        tests/train/test_collectives.py --deselect tests/kernels/test_kernel_codegen.py \
        --deselect tests/kernels/test_gpu_check_dry_run.py --junitxml="$OUT_DIR/tests.xml"
    step logprob 85 python bench/bench_logprob.py --reps 3 --out "$OUT_DIR/bench_logprob.json"
    step logprob_autotune 30 env LATENTR3_AUTOTUNE=1 python bench/bench_logprob.py --reps 3 \
        --rows 1024,16384 --modes fwd,fwd+bwd --variants triton \
        --out "$OUT_DIR/bench_logprob_autotune.json"
    step grpo 65 python bench/bench_grpo.py --device cuda --preset qwen1.5b --dtype bf16 \
        --attn sdpa --prompts 4 --micro 4 --repeats 2 --variants keep_graph,reference \
        --out "$OUT_DIR/bench_grpo.json"
    step sft 45 python bench/bench_sft.py --device cuda --preset qwen1.5b --dtype bf16 \
        --attn sdpa --batch 8 --warmup 1 --reps 2 --out "$OUT_DIR/bench_sft.json"
    step reward 35 python bench/bench_reward.py --device cuda --dtype bf16 --hidden 1536 \
        --layers 28 --heads 12 --kv-heads 2 --inter 8960 --vocab 151936 --repeats 3 --grad \
        --variants fused,plain
    step decode 35 python bench/bench_decode.py --device cuda --rows 16 --batch 8 --beams 10
fi

python - "$OUT_DIR" "$DRY" "$DEV" "$START" <<'PY'
"""Summarise the steps as gpu_check.json + gpu_check.md."""
import json, platform, sys, time
from pathlib import Path

out, dry, dev, start = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    log = (out / f"{name}.log").read_text(errors="replace").splitlines()
    steps.append(dict(name=name, exit=int(rc), seconds=int(secs), command=cmd,
                      timed_out=int(rc) in (124, 137), log_tail=log[-15:]))
info = dict(python=platform.python_version(), dry_run=dry, device=dev,
            time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            total_seconds=int(time.time()) - start)
try:
    import torch, triton
    info.update(torch=torch.__version__, triton=triton.__version__)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
except Exception as exc:  # the summary must still be written
    info["import_error"] = repr(exc)
summary = dict(machine=info, passed=all(s["exit"] == 0 for s in steps), steps=steps)
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
md = [f"# gpu_check ({'dry run, CPU' if dry else info.get('gpu', dev)})", "",
      f"{info['time_utc']}, torch {info.get('torch')}, triton {info.get('triton')}, "
      f"{info['total_seconds']} s in all", "", "| step | exit | seconds |", "|---|---|---|"]
md += [f"| {s['name']} | {s['exit']}{' (timeout)' if s['timed_out'] else ''} | {s['seconds']} |"
       for s in steps]
for name in ("bench_logprob", "bench_logprob_autotune"):
    table = out / f"{name}.md"
    if table.is_file():
        md += ["", f"## {name}", "", table.read_text()]
for s in steps:
    if s["name"] in ("grpo", "sft", "reward", "decode"):
        md += ["", f"## {s['name']} (log tail)", "", "```", *s["log_tail"], "```"]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print(f"gpu_check: {'PASSED' if summary['passed'] else 'FAILED'} "
      f"({info['total_seconds']} s; summary in {out}/gpu_check.md)")
sys.exit(0 if summary["passed"] else 1)
PY
}
main "$@"
exit $?

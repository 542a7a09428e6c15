#!/usr/bin/env bash
# The GPU figures in one call, in priority order, within a time budget (8 minutes by default),
# merged into one JSON file. Offline: every model is randomly initialised.
#
#   bash benchmarks/gpu_suite.sh                      # writes $OUT/gpu_suite.json, or ./gpu_suite.json
#   bash benchmarks/gpu_suite.sh results/h200.json    # or to this path
#   SUITE_BUDGET_S=300 bash benchmarks/gpu_suite.sh   # a shorter budget: later items are skipped
#   SUITE_DEVICE=cpu bash benchmarks/gpu_suite.sh     # the same plumbing with the --quick CPU sizes
#
# Each item is one benchmark script run under `timeout` (its own limit, cut to what is left of
# the budget); its stdout and stderr go to <logs>/<item>.log, and its last line is the JSON
# object of its figures. benchmarks/gpu_suite.py then merges every item's figures, its exit
# status and its seconds, with the GPU's name, the torch version and the date. An item that
# times out or fails is recorded as such and the suite goes on.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
DEVICE="${SUITE_DEVICE:-cuda}"
BUDGET="${SUITE_BUDGET_S:-480}"
DEST="${1:-${OUT:-.}/gpu_suite.json}"
LOGS="${SUITE_LOGS:-$(dirname "$DEST")/gpu_suite_logs}"
mkdir -p "$LOGS" "$(dirname "$DEST")"
: > "$LOGS/manifest.tsv"
START=$(date +%s)

if [ "$DEVICE" = "cpu" ]; then
    SIZE=(--quick --device cpu)
    # aot_eager: the same graphs without inductor's minutes of C++ code generation on a CPU
    BATCH=(--batch-size 4 --steps 1 --compile-backend aot_eager)
else
    SIZE=(--device cuda)
    BATCH=(--batch-size 256 --steps 10)
fi

# item NAME LIMIT_S SCRIPT ARGS...: run one benchmark if at least 20 s of the budget are left
item() {
    local name="$1" limit="$2" script="$3"
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        printf '%s\t%s\t%s\n' "$name" "skipped" "0" >> "$LOGS/manifest.tsv"
        echo "[gpu_suite] $name: skipped, ${left}s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "[gpu_suite] $name: up to ${limit}s"
    local t0=$(date +%s)
    (cd "$HERE" && timeout --kill-after=10 "$limit" "$PY" "$script" "$@") > "$LOGS/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$LOGS/manifest.tsv"
    echo "[gpu_suite] $name: exit $rc after $(($(date +%s) - t0))s"
}

# 0: CUDA correctness first: steps with no host synchronisation (set_sync_debug_mode("error")),
# compiled against eager results, fused Adam; needs pytest (pip install -e ".[test]")
if [ "$DEVICE" != "cpu" ]; then
    item cuda_checks       75 -m pytest -q -p no:cacheprovider ../tests/engine/test_no_sync.py ../tests/engine/test_compile.py
fi
# 1-3: prompted ViT-B/16 training and evaluation, compiled, batch 256, with the fraction of peak
item l2p_compiled         150 l2p_throughput.py "${SIZE[@]}" "${BATCH[@]}" --strategy l2p --compile on --no-reference
item dualprompt_compiled  110 l2p_throughput.py "${SIZE[@]}" "${BATCH[@]}" --strategy dualprompt --compile on
item coda_prompt_compiled 110 l2p_throughput.py "${SIZE[@]}" "${BATCH[@]}" --strategy coda_prompt --compile on
# 4: TPT latency at 1000 classes (ms/sample)
item tpt_latency           60 tpt_latency.py "${SIZE[@]}"
# 5: DynaPrompt peak memory
item dynaprompt_memory     45 dynaprompt_memory.py "${SIZE[@]}"
# 6: the frozen-query cache's evaluation speedup
item query_cache           45 query_cache.py "${SIZE[@]}"
# 7-8: batched TPT/DynaPrompt, and the eager L2P path against the two-copy reference (batch 64)
item tta_batching          60 tta_batching.py "${SIZE[@]}"
item l2p_eager_vs_reference 60 l2p_throughput.py "${SIZE[@]}"

"$PY" "$HERE/gpu_suite.py" --logs "$LOGS" --out "$DEST" --budget-s "$BUDGET" --device "$DEVICE"

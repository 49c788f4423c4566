#!/usr/bin/env bash
# One device run for the decode path (CUDA graphs, async scheduling): its GPU tests, end-to-end throughput with a
# per-step breakdown (async, then synchronous scheduling), batch-1 latency, then the whole GPU suite (FULL_SUITE=1).
# Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
timeout 300 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_decode_graphs_gpu.py tests/test_model_gpu.py \
    2>&1 | tee "$OUT/pytest_engine.log" | tail -15
timeout 120 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "matmul or decode_grid or replayed or sample_rows" 2>&1 | tee "$OUT/pytest_kernels.log" | tail -5
python3 -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b 2>&1 | tail -1
timeout 150 python3 -m bench.bench_throughput --model /tmp/qwen3-0.6b --json "$OUT/throughput.json" \
    2>"$OUT/throughput.err" | tee "$OUT/throughput.txt"
tail -3 "$OUT/throughput.err"
timeout 150 python3 -m bench.bench_throughput --model /tmp/qwen3-0.6b --sync-scheduling \
    --json "$OUT/throughput_sync.json" \
    2>"$OUT/throughput_sync.err" | tee "$OUT/throughput_sync.txt"
tail -3 "$OUT/throughput_sync.err"
timeout 150 python3 -m bench.bench_latency --json "$OUT/latency.json" 2>"$OUT/latency.err" | tee "$OUT/latency.txt"
tail -3 "$OUT/latency.err"
[ -n "${FULL_SUITE:-}" ] && timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -15
exit 0

#!/usr/bin/env bash
# One device run: a Qwen3-0.6B-shaped random checkpoint, then the end-to-end throughput bench with peers.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/tmp/qwen3-0.6b
python3 -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out $CKPT 2>&1 | tail -1
timeout ${E2E_TIMEOUT:-300} python3 -m bench.bench_throughput --model $CKPT --num-requests ${REQUESTS:-256} \
    ${PEERS:---peers --peer-requests 32} --json "$OUT/throughput.json" 2>"$OUT/throughput.err" | tee "$OUT/throughput.txt"
tail -3 "$OUT/throughput.err"

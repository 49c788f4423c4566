#!/usr/bin/env bash
# One device run for the engine core split: the engine's GPU tests, end-to-end throughput against the physical
# floor (Qwen3-0.6B shape; the Llama-3-8B shape with BIG=1), the server against the same requests offline at
# concurrency 64 (and 256 with BIG=1), batch-1 latency, and the server's fuzz and soak tests against the GPU engine.
# FP8=1 adds the Llama-3-8B shape with FP8 weights and an FP8 KV cache (issue 17's end-to-end and batch-1 ratios
# against the bf16 runs of BIG=1).
# FULL_SUITE=1 runs the whole GPU suite instead. pyzmq, msgspec, hypothesis, llguidance, jsonschema and gguf travel as wheels in .whl/ when the
# machine lacks them. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import zmq, msgspec, hypothesis, llguidance, jsonschema, gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=.:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
if [ -n "${FULL_SUITE:-}" ]; then
    timeout ${SUITE_TIMEOUT:-540} python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -15
    exit 0
fi
timeout 240 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_decode_graphs_gpu.py tests/test_model_gpu.py \
    2>&1 | tee "$OUT/pytest_engine.log" | tail -8
python3 -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b 2>&1 | tail -1
timeout 150 python3 -m bench.bench_throughput --model /tmp/qwen3-0.6b --json "$OUT/throughput.json" \
    2>"$OUT/throughput.err" | tee "$OUT/throughput.txt"
tail -2 "$OUT/throughput.err"
timeout 150 python3 -m bench.bench_serve --model /tmp/qwen3-0.6b --device cuda -n 256 -c 64 --input-len 128 \
    --output-len 128 --range-ratio 0.5 --json "$OUT/serve_c64.json" 2>"$OUT/serve_c64.err" | tee "$OUT/serve_c64.txt"
tail -2 "$OUT/serve_c64.err"
if [ -n "${BIG:-}" ]; then
    timeout 200 python3 -m bench.bench_serve --model /tmp/qwen3-0.6b --device cuda -n 256 -c 256 --input-len 562 \
        --output-len 562 --range-ratio 0.8 --json "$OUT/serve_c256.json" 2>"$OUT/serve_c256.err" \
        | tee "$OUT/serve_c256.txt"
    tail -2 "$OUT/serve_c256.err"
    timeout 240 python3 -m bench.bench_throughput --preset llama-3-8b --json "$OUT/throughput_8b.json" \
        2>"$OUT/throughput_8b.err" | tee "$OUT/throughput_8b.txt"
    tail -2 "$OUT/throughput_8b.err"
fi
if [ -n "${FP8:-}" ]; then
    timeout 240 python3 -m bench.bench_throughput --preset llama-3-8b --quantization fp8 --kv-cache-dtype fp8 \
        --json "$OUT/throughput_8b_fp8.json" 2>"$OUT/throughput_8b_fp8.err" | tee "$OUT/throughput_8b_fp8.txt"
    tail -2 "$OUT/throughput_8b_fp8.err"
    timeout 120 python3 -m bench.bench_latency --shapes llama-3-8b --quantization fp8 --no-eager \
        --json "$OUT/latency_8b_fp8.json" 2>"$OUT/latency_8b_fp8.err" | tee "$OUT/latency_8b_fp8.txt"
fi
timeout 120 python3 -m bench.bench_latency --shapes qwen3-0.6b --json "$OUT/latency.json" 2>"$OUT/latency.err" \
    | tee "$OUT/latency.txt"
tail -2 "$OUT/latency.err"
CUPAGED_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fuzz_server.py -k "not seeded" \
    2>&1 | tee "$OUT/pytest_fuzz_gpu.log" | tail -4
exit 0

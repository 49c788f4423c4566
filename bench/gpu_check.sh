#!/usr/bin/env bash
# One device run: environment, GPU tests, decode-attention benchmark. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --timeout 90 -s ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
timeout 240 python3 -m bench.bench_decode_attention --json "$OUT/decode_attention.json" 2>"$OUT/decode_bench.err" | tee "$OUT/decode_bench.txt"
tail -5 "$OUT/decode_bench.err"

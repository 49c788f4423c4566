#!/usr/bin/env bash
# One device run for the flash prefill kernel (cuda/flash_prefill.cu): ptxas report, its GPU tests, the prefill
# bench (every tile config, torch flash SDPA as peer). Logs and JSON go to $OUT; the bench's tables print last.
#   OUT=/tmp/out bash bench/run_prefill_check.sh          (PYTEST_K=... narrows the tests, BENCH_ARGS=... the bench)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/env.txt"
python3 -c "import torch; print('torch', torch.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"

if command -v nvcc >/dev/null; then  # registers and spills of every instantiation, for the record
    nvcc -arch=sm_90 --std=c++17 -cubin -Xptxas -v -DCUPAGED_NVCC_CHECK cuda/flash_prefill.cu \
        -o "$OUT/flash_prefill.cubin" 2> "$OUT/ptxas.txt" || echo "nvcc failed (see $OUT/ptxas.txt)"
    grep -E "registers|spill" "$OUT/ptxas.txt" | paste - - | sed -E 's/ +/ /g' | head -20
fi

timeout 360 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_flash_prefill_gpu.py \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest_flash_prefill.log" | tail -25
tests=$?

# The tests must be able to fail: a causal mask off by one (a query no longer sees its own key) and an online
# softmax that forgets to rescale the accumulator must both be caught.
for m in mask rescale; do
    rm -rf /tmp/cuda_fp_$m && cp -r cuda /tmp/cuda_fp_$m
    case $m in
        mask) sed -i 's/(e >> 1) \* 8 > diag)/(e >> 1) * 8 >= diag)/' /tmp/cuda_fp_$m/flash_prefill.cu ;;
        rescale) sed -i 's/o\[mt\]\[d\]\[2 \* h\] \*= alpha;/;/' /tmp/cuda_fp_$m/flash_prefill.cu ;;
    esac
    if cmp -s cuda/flash_prefill.cu /tmp/cuda_fp_$m/flash_prefill.cu; then echo "mutant $m: sed did not apply"; continue; fi
    CUPAGED_CUDA_DIR=/tmp/cuda_fp_$m timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_flash_prefill_gpu.py -k "test_tile_and_block_edges" 2>&1 | tail -1 | sed "s/^/mutant $m (should fail): /"
done 2>&1 | tee "$OUT/mutants.log"

timeout 420 python3 -m bench.bench_prefill_attention --json "$OUT/prefill_attention.json" ${BENCH_ARGS:-} \
    2> "$OUT/prefill_bench.err" | tee "$OUT/prefill_bench.txt"
bench=$?
tail -3 "$OUT/prefill_bench.err"
echo "tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

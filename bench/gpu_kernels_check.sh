#!/usr/bin/env bash
# One device run for the CUDA kernels: environment, every kernel against the reference (tests/test_kernels_gpu.py),
# proof that those tests fail on deliberately broken decode kernels, the decode-attention benchmark (with the
# partition sweep), then the model's GPU tests as an end-to-end check. Logs and JSON go to $OUT.
#   OUT=/tmp/out bash bench/gpu_kernels_check.sh        (STAGES="tests bench mutants model" by default;
#   BUDGET_S bounds the whole run)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"tests bench mutants model"}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-1200} ))  # stages that would start with under a minute left are skipped
has() { [[ " $STAGES " == *" $1 "* ]] && (( DEADLINE - $(date +%s) > 60 )) || { echo "(skipping $1)"; false; }; }
left() { local l=$(( DEADLINE - $(date +%s) )); (( l < $1 )) && echo $l || echo $1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$OUT/env.txt"

if has tests; then
    echo "== kernel tests"
    timeout $(left ${TEST_TIMEOUT:-300}) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 \
        | tee "$OUT/pytest_kernels.log" | grep -E "passed|failed|FAILED|Error" | tail -25
fi

if has bench; then
    echo "== decode attention benchmark"
    timeout $(left ${BENCH_TIMEOUT:-420}) python3 -m bench.bench_decode_attention ${BENCH_ARGS:---sweep} \
        --json "$OUT/decode_attention.json" 2>"$OUT/decode_bench.err" | tee "$OUT/decode_bench.txt"
    grep -v "decode attention" "$OUT/decode_bench.err" | tail -5
fi

if has mutants; then
    # The tests must be able to fail: a decode kernel that rescales with the wrong head's max, and one that reads
    # the V rows past a sequence's end (the stale slots hold NaN), must both be caught.
    echo "== mutants (each line should report failures)"
    for m in alpha guard; do
        rm -rf /tmp/cuda_$m && cp -r cuda /tmp/cuda_$m
        case $m in
            alpha) sed -i 's/__shfl_sync(0xffffffffu, alpha, 8 \* q4 + 4)/__shfl_sync(0xffffffffu, alpha, 8 * q4)/' \
                       /tmp/cuda_$m/paged_attention.cu ;;
            guard) sed -i 's|if (t < end) {  // a token past the end is never read|if (true) {|' \
                       /tmp/cuda_$m/paged_attention.cu ;;
        esac
        if cmp -s cuda/paged_attention.cu /tmp/cuda_$m/paged_attention.cu; then echo "mutant $m: sed did not apply"; continue; fi
        CUPAGED_CUDA_DIR=/tmp/cuda_$m timeout $(left 90) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
            -k "test_paged_decode_attention and bfloat16 and 32-8-128" 2>&1 | tail -1 | sed "s/^/mutant $m: /"
    done 2>&1 | tee "$OUT/mutants.log"
fi

if has model; then
    echo "== model GPU tests (end to end through cuda_ops)"
    timeout $(left ${MODEL_TIMEOUT:-200}) python3 -m pytest -q -p no:cacheprovider tests/test_model_gpu.py 2>&1 \
        | tee "$OUT/pytest_model.log" | grep -E "passed|failed|FAILED|Error" | tail -15
fi

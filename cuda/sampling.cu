// Token choice on the GPU, one CTA per row of float32 logits: greedy (temperature <= 0) or an inverse-CDF draw after
// temperature and min-p (layers/reference.py sample_rows is the oracle). Rows that need top-k or top-p (a sort) go
// through the array code in sampler.py instead.
//
// Sampling: weights w_i = exp((x_i - max) / T), set to 0 where w_i < min_p (p_i < min_p * p_max); the token is the
// first i with w_i > 0 whose running sum of weights reaches u * sum(w), u the row's uniform number. Every sum runs
// over fixed 256-token segments in a fixed order, so a row's result does not depend on the rows around it (a
// seeded request samples the same tokens whatever shares its batch) or on the launch.
//
// Structured outputs: a row may come with a packed mask (llguidance's layout: bit i % 32 of word i / 32 allows token
// i); a token it does not allow reads as -inf, so the logits are neither copied nor written. Rows with top-k / top-p
// are masked in place by mask_logits before their sort instead: that path already writes [B, V] arrays, and masking
// inside it would mean a sort kernel of our own.
//
// Pass 1 (all warps): the maximum and its first index. Pass 2 (all warps): each segment's weight sum into shared
// memory. Pass 3 (warp 0): scan the segment sums for the segment where the running sum reaches the target, then
// scan that segment's weights.
#include "common.cuh"
using namespace cupaged;

namespace {

constexpr int THREADS = 1024, WARPS = THREADS / 32, PER_LANE = 8, SEGMENT = 32 * PER_LANE;

// Logit i of a row, -inf where the row's mask (null: none) does not allow token i.
__device__ __forceinline__ float logit(const float* x, const unsigned* mask, int i) {
    if (mask != nullptr && !((mask[i >> 5] >> (i & 31)) & 1u)) return neg_inf();
    return x[i];
}

__device__ __forceinline__ float weight(const float* x, const unsigned* mask, int i, int vocab, float m, float inv_t,
                                        float min_p) {
    if (i >= vocab) return 0.f;
    const float w = expf((logit(x, mask, i) - m) * inv_t);
    return w >= min_p ? w : 0.f;
}

// The mask of row b: null when there are no masks (has_masks 0) or the row has none (mask_rows[b] < 0).
__device__ __forceinline__ const unsigned* row_mask(int b, int has_masks, const int* mask_rows,
                                                    const unsigned* bitmask, int words) {
    if (!has_masks || mask_rows[b] < 0) return nullptr;
    return bitmask + static_cast<long long>(mask_rows[b]) * words;
}

// Inclusive prefix sum over the lanes of a warp.
__device__ __forceinline__ float warp_scan(float v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

}  // namespace

// tokens[b] for row b of logits (row stride `stride`, `vocab` entries); temperature, min_p, uniform: one per row.
// With has_masks, row b's mask is bitmask[mask_rows[b]] (`words` = ceil(vocab / 32) ints a mask), none where
// mask_rows[b] is -1; without, neither pointer is read. A mask must allow at least one token (the engine sees to it).
// Dynamic shared memory: 4 * ceil(vocab / 256) bytes.
extern "C" __global__ void __launch_bounds__(THREADS)
sample_rows(int* __restrict__ tokens, const float* __restrict__ logits, long long stride, int vocab,
            const float* __restrict__ temperature, const float* __restrict__ min_p,
            const float* __restrict__ uniform, int has_masks, const int* __restrict__ mask_rows,
            const unsigned* __restrict__ bitmask, int words) {
    extern __shared__ float s_seg[];
    __shared__ float s_max[WARPS];
    __shared__ int s_arg[WARPS];
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const float* x = logits + b * stride;
    const unsigned* mask = row_mask(b, has_masks, mask_rows, bitmask, words);

    // ---- pass 1: max, first index of it (ties: the lowest index, as numpy's argmax)
    float best = neg_inf();
    int arg = vocab;
    for (int i = tid; i < vocab; i += THREADS) {
        const float v = logit(x, mask, i);
        if (v > best || (arg == vocab && i < arg)) { best = v; arg = i; }  // the first value seen always counts
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int a = __shfl_xor_sync(0xffffffffu, arg, o);
        if (v > best || (v == best && a < arg)) { best = v; arg = a; }
    }
    if (lane == 0) { s_max[warp] = best; s_arg[warp] = arg; }
    __syncthreads();
    best = s_max[0];
    arg = s_arg[0];
    for (int w = 1; w < WARPS; ++w)
        if (s_max[w] > best || (s_max[w] == best && s_arg[w] < arg)) { best = s_max[w]; arg = s_arg[w]; }
    const float t = temperature[b];
    if (t <= 0.f) {
        if (tid == 0) tokens[b] = arg;
        return;
    }
    const float inv_t = 1.f / t, mp = min_p[b];

    // ---- pass 2: weight sum of each segment (lane l takes its elements l, l + 32, ...: coalesced)
    const int segments = (vocab + SEGMENT - 1) / SEGMENT;
    for (int s = warp; s < segments; s += WARPS) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) sum += weight(x, mask, s * SEGMENT + 32 * j + lane, vocab, best, inv_t, mp);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) s_seg[s] = sum;
    }
    __syncthreads();
    if (warp != 0) return;

    // ---- pass 3 (one warp): the total, then the segment and the token where the running sum reaches u * total
    float total = 0.f;
    for (int c = 0; c < segments; c += 32) {
        const float v = c + lane < segments ? s_seg[c + lane] : 0.f;
        total += __shfl_sync(0xffffffffu, warp_scan(v, lane), 31);
    }
    const float target = uniform[b] * total;
    float carry = 0.f;
    int seg = -1, last_nonzero = -1;
    for (int c = 0; c < segments && seg < 0; c += 32) {
        const float v = c + lane < segments ? s_seg[c + lane] : 0.f;
        const float run = carry + warp_scan(v, lane);
        const unsigned hit = __ballot_sync(0xffffffffu, v > 0.f && run >= target);
        const unsigned nonzero = __ballot_sync(0xffffffffu, v > 0.f);
        if (nonzero) last_nonzero = c + 31 - __clz(nonzero);
        if (hit) {
            const int l = __ffs(hit) - 1;
            seg = c + l;
            carry = __shfl_sync(0xffffffffu, run - v, l);  // the running sum before that segment
        } else {
            carry = __shfl_sync(0xffffffffu, run, 31);
        }
    }
    if (seg < 0) { seg = last_nonzero; carry = 0.f; }  // rounding left the target past the end: the last segment
    float run = carry;
    int token = -1, last = -1;
    for (int j = 0; j < PER_LANE && token < 0; ++j) {
        const int i = seg * SEGMENT + 32 * j + lane;
        const float w = weight(x, mask, i, vocab, best, inv_t, mp);
        const float r = run + warp_scan(w, lane);
        const unsigned hit = __ballot_sync(0xffffffffu, w > 0.f && r >= target);
        const unsigned nonzero = __ballot_sync(0xffffffffu, w > 0.f);
        if (nonzero) last = seg * SEGMENT + 32 * j + 31 - __clz(nonzero);
        if (hit) token = seg * SEGMENT + 32 * j + __ffs(hit) - 1;
        run = __shfl_sync(0xffffffffu, r, 31);
    }
    if (lane == 0) tokens[b] = token >= 0 ? token : last;
}

// In place: logits[b, i] = -inf where row b's mask does not allow token i (same mask arguments as sample_rows, masks
// always given). Grid (ceil(vocab / 256), rows), 256 threads: one token a thread.
extern "C" __global__ void __launch_bounds__(256)
mask_logits(float* __restrict__ logits, long long stride, int vocab, const int* __restrict__ mask_rows,
            const unsigned* __restrict__ bitmask, int words) {
    const int b = blockIdx.y, i = blockIdx.x * 256 + threadIdx.x;
    const unsigned* mask = row_mask(b, 1, mask_rows, bitmask, words);
    if (mask == nullptr || i >= vocab) return;
    if (!((mask[i >> 5] >> (i & 31)) & 1u)) logits[b * stride + i] = neg_inf();
}

// Paged decode attention: one query token per sequence against its K/V in the paged cache.
//
// Grid (splits, head chunks, sequences). A CTA takes HEADS query heads that share one KV head (all of the group
// when it has 8 or fewer) and one partition of `partition` consecutive tokens, so each K/V tile is read once and
// used by every query head of the group. Thread layout: a token's head_dim-wide K (or V) row is read by TPT
// threads, 16 bytes each; a CTA covers THREADS / TPT tokens at once, UNROLL times over before using the data.
// Three passes over the partition: scores q.k into shared memory, softmax statistics, then p.V. With more than
// one partition per sequence (long contexts, small batches: the host picks `partition` to fill the SMs), each
// CTA writes a normalised partial output with its max and sum, and paged_decode_reduce combines them.
#include "common.cuh"
using namespace cupaged;

constexpr int THREADS = 128, WARPS = THREADS / 32;

template <typename T, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(THREADS)
paged_decode_attention(T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
                       float* __restrict__ part_sum, const T* __restrict__ q, long long q_stride,
                       const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                       const int* __restrict__ block_tables, int max_blocks, const int* __restrict__ seq_lens,
                       int num_kv_heads, int group, int block_size, int partition, float scale) {
    constexpr int N = Vec<T>::N, TPT = HEAD_DIM / N, TOKENS = THREADS / TPT;
    constexpr int UNROLL = HEADS * N <= 32 ? 8 : 4;  // loads in flight per thread, as registers allow
    static_assert(TPT <= 32 && 32 % TPT == 0, "a K row must be read by a power-of-two part of one warp");
    const int split = blockIdx.x, b = blockIdx.z, num_splits = gridDim.x;
    const int head0 = blockIdx.y * HEADS, kvh = head0 / group, num_heads = num_kv_heads * group;
    const int seq_len = seq_lens[b], start = split * partition;
    if (start >= seq_len) return;  // the reducer only reads the partitions that hold tokens
    const int end = min(start + partition, seq_len), n = end - start;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, tok_lane = tid % TPT, tok_group = tid / TPT;
    extern __shared__ float smem[];  // scores [HEADS][partition]; later partial sums [WARPS][HEADS][HEAD_DIM]
    __shared__ float s_max[HEADS], s_sum[HEADS];

    float qv[HEADS][N];
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
        load_vec(q + b * q_stride + (long long)(head0 + g) * HEAD_DIM + tok_lane * N, qv[g]);
#pragma unroll
        for (int i = 0; i < N; ++i) qv[g][i] *= scale;
    }
    const int* table = block_tables + (long long)b * max_blocks;
    const long long head_offset = (long long)kvh * block_size * HEAD_DIM + tok_lane * N;
    const long long block_stride = (long long)num_kv_heads * block_size * HEAD_DIM;

    // pass 1: scores. The loop bounds are the same for every lane (shuffles below need the whole warp).
    for (int base = start; base < end; base += TOKENS * UNROLL) {
        const int t0 = base + tok_group;
        float kv[UNROLL][N];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
                load_vec(k_cache + table[t / block_size] * block_stride + head_offset
                         + (long long)(t % block_size) * HEAD_DIM, kv[u]);
            } else {
#pragma unroll
                for (int i = 0; i < N; ++i) kv[u][i] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
#pragma unroll
            for (int g = 0; g < HEADS; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < N; ++i) dot += qv[g][i] * kv[u][i];
#pragma unroll
                for (int o = TPT / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (tok_lane == 0 && t < end) smem[g * partition + (t - start)] = dot;
            }
        }
    }
    __syncthreads();

    // pass 2: softmax statistics; scores become exp(score - max)
    for (int g = warp; g < HEADS; g += WARPS) {
        float m = __int_as_float(0xff800000)  /* -inf; NVRTC has no math.h */;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, smem[g * partition + i]);
        m = warp_max(m);
        float s = 0.f;
        for (int i = lane; i < n; i += 32) {
            const float e = __expf(smem[g * partition + i] - m);
            smem[g * partition + i] = e;
            s += e;
        }
        s = warp_sum(s);
        if (lane == 0) { s_max[g] = m; s_sum[g] = s; }
    }
    __syncthreads();

    // pass 3: p.V
    float acc[HEADS][N];
#pragma unroll
    for (int g = 0; g < HEADS; ++g)
#pragma unroll
        for (int i = 0; i < N; ++i) acc[g][i] = 0.f;
    for (int base = start; base < end; base += TOKENS * UNROLL) {
        const int t0 = base + tok_group;
        float vv[UNROLL][N];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
                load_vec(v_cache + table[t / block_size] * block_stride + head_offset
                         + (long long)(t % block_size) * HEAD_DIM, vv[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
#pragma unroll
                for (int g = 0; g < HEADS; ++g) {
                    const float p = smem[g * partition + (t - start)];
#pragma unroll
                    for (int i = 0; i < N; ++i) acc[g][i] += p * vv[u][i];
                }
            }
        }
    }
    // sum over the token groups of a warp (lanes that differ in the bits above TPT), then over warps
#pragma unroll
    for (int o = TPT; o < 32; o <<= 1)
#pragma unroll
        for (int g = 0; g < HEADS; ++g)
#pragma unroll
            for (int i = 0; i < N; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    __syncthreads();  // everyone is done with the scores: reuse the shared memory
    if (lane < TPT) {
#pragma unroll
        for (int g = 0; g < HEADS; ++g)
#pragma unroll
            for (int i = 0; i < N; ++i) smem[(warp * HEADS + g) * HEAD_DIM + tok_lane * N + i] = acc[g][i];
    }
    __syncthreads();
    for (int j = tid; j < HEADS * HEAD_DIM; j += THREADS) {
        const int g = j / HEAD_DIM, d = j % HEAD_DIM;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += smem[(w * HEADS + g) * HEAD_DIM + d];
        const long long row = (long long)b * num_heads + head0 + g;
        if (num_splits == 1) {
            out[row * HEAD_DIM + d] = from_float<T>(sum / s_sum[g]);
        } else {
            part_out[(row * num_splits + split) * HEAD_DIM + d] = sum / s_sum[g];
            if (d == 0) {
                part_max[row * num_splits + split] = s_max[g];
                part_sum[row * num_splits + split] = s_sum[g];
            }
        }
    }
}

// Combine the partitions of each (sequence, head): weights sum_s * exp(max_s - max). Grid (heads, sequences).
template <typename T, int HEAD_DIM>
__global__ void paged_decode_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                                    const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                    const int* __restrict__ seq_lens, int partition, int buffer_splits) {
    const int h = blockIdx.x, b = blockIdx.y, num_heads = gridDim.x;
    extern __shared__ float weight[];  // [buffer_splits]
    __shared__ float s_total;
    const long long row = (long long)b * num_heads + h;
    const int splits = (seq_lens[b] + partition - 1) / partition;  // partitions that hold tokens
    if (threadIdx.x == 0) {
        float m = __int_as_float(0xff800000)  /* -inf; NVRTC has no math.h */;
        for (int s = 0; s < splits; ++s) m = fmaxf(m, part_max[row * buffer_splits + s]);
        float total = 0.f;
        for (int s = 0; s < splits; ++s) {
            weight[s] = part_sum[row * buffer_splits + s] * __expf(part_max[row * buffer_splits + s] - m);
            total += weight[s];
        }
        s_total = total;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < splits; ++s) v += weight[s] * part_out[(row * buffer_splits + s) * HEAD_DIM + d];
        out[row * HEAD_DIM + d] = from_float<T>(v / s_total);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void paged_decode_attention<__nv_bfloat16, 128, 4>(__nv_bfloat16*, float*, float*, float*, const __nv_bfloat16*, long long, const __nv_bfloat16*, const __nv_bfloat16*, const int*, int, const int*, int, int, int, int, float);
template __global__ void paged_decode_attention<__half, 64, 8>(__half*, float*, float*, float*, const __half*, long long, const __half*, const __half*, const int*, int, const int*, int, int, int, int, float);
template __global__ void paged_decode_attention<float, 128, 2>(float*, float*, float*, float*, const float*, long long, const float*, const float*, const int*, int, const int*, int, int, int, int, float);
template __global__ void paged_decode_attention<__nv_bfloat16, 256, 8>(__nv_bfloat16*, float*, float*, float*, const __nv_bfloat16*, long long, const __nv_bfloat16*, const __nv_bfloat16*, const int*, int, const int*, int, int, int, int, float);
template __global__ void paged_decode_reduce<__nv_bfloat16, 128>(__nv_bfloat16*, const float*, const float*, const float*, const int*, int, int);
#endif

// The paged KV cache: writing new tokens' K/V through the slot mapping, and copying whole blocks.
// Cache layout per layer: [num_blocks, num_kv_heads, block_size, head_dim].
#include "common.cuh"
using namespace cupaged;

// k, v: [T, Hkv, D] with rows `k_stride` / `v_stride` elements apart. One thread per 16 bytes of one head.
template <typename T>
__global__ void write_kv(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                         T* __restrict__ v_cache, const int* __restrict__ slot_mapping, int tokens,
                         int num_kv_heads, int head_dim, int block_size, long long k_stride, long long v_stride) {
    constexpr int N = Vec<T>::N;
    const int vecs = num_kv_heads * head_dim / N;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * vecs) return;
    const int t = i / vecs, e = (i % vecs) * N, head = e / head_dim, d = e % head_dim;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const long long dst = (((long long)(slot / block_size) * num_kv_heads + head) * block_size + slot % block_size)
                          * head_dim + d;
    *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k + t * k_stride + e);
    *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v + t * v_stride + e);
}

// FP8 cache (cupaged/fp8.py): each (token, head) row of head_dim values gets the power-of-two scale of its max
// |value| (one exponent byte in k_scale / v_scale [num_blocks, num_kv_heads, block_size]) and is stored as e4m3
// codes of value / scale (exact division: a power of two), bit-identical to fp8.quantize_rows.
// GROUP = head_dim / 8 threads take one row, 8 values (16 bytes of T) each; GROUP divides 32, so a row's
// threads are in one warp and its max is a shuffle reduction. Threads past the end still take part in it.
template <typename T>
__global__ void write_kv_fp8(const T* __restrict__ k, const T* __restrict__ v, unsigned char* __restrict__ k_cache,
                             unsigned char* __restrict__ v_cache, unsigned char* __restrict__ k_scale,
                             unsigned char* __restrict__ v_scale, const int* __restrict__ slot_mapping, int tokens,
                             int num_kv_heads, int head_dim, int block_size, long long k_stride, long long v_stride) {
    const int group = head_dim / 8;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long row = i / group;  // (token, head)
    const int part = i % group;
    const bool valid = row < (long long)tokens * num_kv_heads;
    const int t = valid ? row / num_kv_heads : 0, head = row % num_kv_heads, d = part * 8;
    const int slot = valid ? slot_mapping[t] : -1;
    const long long dst_row = slot < 0 ? 0 : ((long long)(slot / block_size) * num_kv_heads + head) * block_size
                                             + slot % block_size;
    float x[2][8], amax[2] = {0.f, 0.f};  // [0]: K, [1]: V
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        if (valid) {
            load_vec((which == 0 ? k + t * k_stride : v + t * v_stride) + head * head_dim + d, x[which]);
#pragma unroll
            for (int j = 0; j < 8; ++j) amax[which] = fmaxf(amax[which], fabsf(x[which][j]));
        }
        for (int o = group / 2; o > 0; o >>= 1)
            amax[which] = fmaxf(amax[which], __shfl_xor_sync(0xffffffffu, amax[which], o));
    }
    if (slot < 0) return;  // after the shuffles: every lane of the warp took part in them
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        const unsigned e = scale_exponent(amax[which]);
        const float inv = exponent_scale(254u - e);
        *reinterpret_cast<uint2*>((which == 0 ? k_cache : v_cache) + dst_row * head_dim + d) =
            float8_to_e4m3x8(x[which], inv);
        if (part == 0) (which == 0 ? k_scale : v_scale)[dst_row] = (unsigned char)e;
    }
}

// For each pair i and each layer: block dst[i] = block src[i], K and V. Caches: [layers, blocks, block_elems],
// moved in units of V (uint4, or unsigned char when a block is not whole 16-byte units: FP8 scales).
// Destinations are freshly taken blocks, never a source in the same launch, so the order of copies is free.
template <typename V>
__global__ void copy_blocks(V* __restrict__ k_cache, V* __restrict__ v_cache, const int* __restrict__ src,
                            const int* __restrict__ dst, long long num_blocks, int block_vecs) {
    const int pair = blockIdx.x, layer = blockIdx.y;
    const long long from = (layer * num_blocks + src[pair]) * block_vecs;
    const long long to = (layer * num_blocks + dst[pair]) * block_vecs;
    for (int j = threadIdx.x; j < block_vecs; j += blockDim.x) {
        k_cache[to + j] = k_cache[from + j];
        v_cache[to + j] = v_cache[from + j];
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void write_kv<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, const int*, int, int, int, int, long long, long long);
template __global__ void write_kv_fp8<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, unsigned char*, unsigned char*, unsigned char*, unsigned char*, const int*, int, int, int, int, long long, long long);
template __global__ void write_kv_fp8<__half>(const __half*, const __half*, unsigned char*, unsigned char*, unsigned char*, unsigned char*, const int*, int, int, int, int, long long, long long);
template __global__ void copy_blocks<uint4>(uint4*, uint4*, const int*, const int*, long long, int);
template __global__ void copy_blocks<unsigned char>(unsigned char*, unsigned char*, const int*, const int*, long long, int);
#endif

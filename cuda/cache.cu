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

// For each pair i and each layer: block dst[i] = block src[i], K and V. Caches: [layers, blocks, block_elems].
// Destinations are freshly taken blocks, never a source in the same launch, so the order of copies is free.
__global__ void copy_blocks(uint4* __restrict__ k_cache, uint4* __restrict__ v_cache, const int* __restrict__ src,
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
#endif

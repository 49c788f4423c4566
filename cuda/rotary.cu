// Rotary embedding in place on q [T, Hq, D] and k [T, Hkv, D] (heads and elements contiguous, token rows
// `*_stride` elements apart), NeoX / Hugging Face rotate_half style on the two halves of each head:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos_sin [max_pos, D] float32: cos in the first D/2 columns,
// sin in the last D/2. Grid (tokens, ceil(items / blockDim)); an item is VEC consecutive pairs of one head.
// VEC = 16 / sizeof(T) (16-byte loads; needs D/2 % VEC == 0 and 16-byte aligned rows) or 1.
#include "common.cuh"
using namespace cupaged;

template <typename T, int VEC>
__global__ void rotary(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                       const float* __restrict__ cos_sin, int num_q_heads, int num_kv_heads, int head_dim,
                       long long q_stride, long long k_stride) {
    const int t = blockIdx.x, half = head_dim / 2, per_head = half / VEC;
    const int item = blockIdx.y * blockDim.x + threadIdx.x;
    if (item >= (num_q_heads + num_kv_heads) * per_head) return;
    const int head = item / per_head, i = (item % per_head) * VEC;
    const float* cs = cos_sin + (long long)positions[t] * head_dim;
    T* x = head < num_q_heads ? q + t * q_stride + (long long)head * head_dim
                              : k + t * k_stride + (long long)(head - num_q_heads) * head_dim;
    if constexpr (VEC == 1) {
        const float x1 = to_float(x[i]), x2 = to_float(x[i + half]), c = cs[i], s = cs[i + half];
        x[i] = from_float<T>(x1 * c - x2 * s);
        x[i + half] = from_float<T>(x2 * c + x1 * s);
    } else {
        static_assert(VEC == Vec<T>::N, "VEC is 1 or one 16-byte vector");
        float x1[VEC], x2[VEC], c[VEC], s[VEC], o1[VEC], o2[VEC];
        load_vec(x + i, x1);
        load_vec(x + i + half, x2);
#pragma unroll
        for (int j = 0; j < VEC; j += 4) {
            load_vec(cs + i + j, c + j);
            load_vec(cs + half + i + j, s + j);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            o1[j] = x1[j] * c[j] - x2[j] * s[j];
            o2[j] = x2[j] * c[j] + x1[j] * s[j];
        }
        store_vec(x + i, o1);
        store_vec(x + i + half, o2);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void rotary<__nv_bfloat16, 8>(__nv_bfloat16*, __nv_bfloat16*, const int*, const float*, int, int, int, long long, long long);
template __global__ void rotary<__half, 1>(__half*, __half*, const int*, const float*, int, int, int, long long, long long);
template __global__ void rotary<float, 4>(float*, float*, const int*, const float*, int, int, int, long long, long long);
#endif

// Rotary embedding in place on q [T, Hq, D] and k [T, Hkv, D] (rows `*_stride` elements apart), NeoX style:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves. cos_sin [max_pos, D]: cos | sin.
#include "common.cuh"
using namespace cupaged;

template <typename T>
__global__ void rotary(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                       const float* __restrict__ cos_sin, int num_q_heads, int num_kv_heads, int head_dim,
                       long long q_stride, long long k_stride) {
    const int t = blockIdx.x, half = head_dim / 2;
    const float* cs = cos_sin + (long long)positions[t] * head_dim;
    for (int j = threadIdx.x; j < (num_q_heads + num_kv_heads) * half; j += blockDim.x) {
        const int head = j / half, i = j % half;
        T* x = head < num_q_heads ? q + t * q_stride + head * head_dim
                                  : k + t * k_stride + (head - num_q_heads) * head_dim;
        const float x1 = to_float(x[i]), x2 = to_float(x[i + half]), c = cs[i], s = cs[i + half];
        x[i] = from_float<T>(x1 * c - x2 * s);
        x[i + half] = from_float<T>(x2 * c + x1 * s);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void rotary<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, const int*, const float*, int, int, int, long long, long long);
#endif

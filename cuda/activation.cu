// SiLU-and-multiply: out[t, i] = silu(x[t, i]) * x[t, I + i], 16-byte vectors.
#include "common.cuh"
using namespace cupaged;

template <typename T>
__global__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ x, int tokens, int inter) {
    constexpr int N = Vec<T>::N;
    const long long vecs_per_row = inter / N;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= tokens * vecs_per_row) return;
    const long long t = i / vecs_per_row, c = (i % vecs_per_row) * N;
    float g[N], u[N];
    load_vec(x + t * 2 * inter + c, g);
    load_vec(x + t * 2 * inter + inter + c, u);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = g[k] / (1.f + __expf(-g[k])) * u[k];
    store_vec(out + t * inter + c, g);
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void silu_and_mul<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, int, int);
#endif

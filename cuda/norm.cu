// RMSNorm, plain and fused with the residual add. One warp per row; statistics in fp32.
// Weights W are the input's type or float32. Row lengths are multiples of the 16-byte vector of T.
#include "common.cuh"
using namespace cupaged;

// N weights as floats, from 16-byte loads (W = T: one load; W = float with T 16-bit: two).
template <typename W, int N>
__device__ __forceinline__ void load_weights(const W* p, float* out) {
    constexpr int M = Vec<W>::N;
#pragma unroll
    for (int j = 0; j < N; j += M) load_vec(p + j, out + j);
}

// out [rows, cols] (contiguous) = x / sqrt(mean(x^2) + eps) * w. Row r of x is the [heads]-strided view
// x + (r / heads) * stride0 + (r % heads) * stride1 (a [T, H, D] view of a fused projection, or plain rows).
template <typename T, typename W>
__global__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const W* __restrict__ w, int rows, int cols,
                         int heads, long long stride0, long long stride1, float eps) {
    constexpr int N = Vec<T>::N;
    static_assert(N % Vec<W>::N == 0, "W is T or float");
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (long long)(row / heads) * stride0 + (long long)(row % heads) * stride1;
    float ss = 0.f, v[N];
#pragma unroll 4
    for (int c = lane * N; c < cols; c += 32 * N) {
        load_vec(xr + c, v);
#pragma unroll
        for (int i = 0; i < N; ++i) ss += v[i] * v[i];
    }
    const float inv = rsqrtf(warp_sum(ss) / cols + eps);
    float wv[N];
#pragma unroll 4
    for (int c = lane * N; c < cols; c += 32 * N) {
        load_vec(xr + c, v);
        load_weights<W, N>(w + c, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = v[i] * inv * wv[i];
        store_vec(out + (long long)row * cols + c, v);
    }
}

// residual[r] = x[r] + residual[r] (in place, rounded to the residual's type R); out[r] = rms_norm(residual[r]) * w.
// x, residual, out: contiguous [rows, cols].
template <typename T, typename R, typename W>
__global__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, R* __restrict__ residual,
                             const W* __restrict__ w, int rows, int cols, float eps) {
    constexpr int N = Vec<T>::N;
    constexpr int M = Vec<R>::N;  // residual elements per 16 bytes
    static_assert(N % M == 0 && N % Vec<W>::N == 0, "R and W are T or float");
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long base = (long long)row * cols;
    float ss = 0.f, a[N], b[N];
#pragma unroll 4
    for (int c = lane * N; c < cols; c += 32 * N) {
        load_vec(x + base + c, a);
#pragma unroll
        for (int j = 0; j < N; j += M) load_vec(residual + base + c + j, b + j);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            b[i] = to_float(from_float<R>(a[i] + b[i]));
            ss += b[i] * b[i];
        }
#pragma unroll
        for (int j = 0; j < N; j += M) store_vec(residual + base + c + j, b + j);
    }
    const float inv = rsqrtf(warp_sum(ss) / cols + eps);
#pragma unroll 4
    for (int c = lane * N; c < cols; c += 32 * N) {
#pragma unroll
        for (int j = 0; j < N; j += M) load_vec(residual + base + c + j, b + j);  // what this lane wrote
        load_weights<W, N>(w + c, a);
#pragma unroll
        for (int i = 0; i < N; ++i) b[i] = b[i] * inv * a[i];
        store_vec(out + base + c, b);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void rms_norm<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int, int, int, long long, long long, float);
template __global__ void rms_norm<__half, float>(__half*, const __half*, const float*, int, int, int, long long, long long, float);
template __global__ void rms_norm<float, float>(float*, const float*, const float*, int, int, int, long long, long long, float);
template __global__ void add_rms_norm<__half, __half, __half>(__half*, const __half*, __half*, const __half*, int, int, float);
template __global__ void add_rms_norm<__nv_bfloat16, float, __nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, float*, const __nv_bfloat16*, int, int, float);
template __global__ void add_rms_norm<__nv_bfloat16, float, float>(__nv_bfloat16*, const __nv_bfloat16*, float*, const float*, int, int, float);
template __global__ void add_rms_norm<float, float, float>(float*, const float*, float*, const float*, int, int, float);
#endif

// RMSNorm, plain and fused with the residual add. One warp per row; statistics in fp32.
#include "common.cuh"
using namespace cupaged;

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; rows of `cols` elements, x rows `x_stride` elements apart.
template <typename T>
__global__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                         int rows, int cols, long long x_stride, float eps) {
    constexpr int N = Vec<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * x_stride;
    float ss = 0.f, v[N];
    for (int c = lane * N; c < cols; c += 32 * N) {
        load_vec(xr + c, v);
#pragma unroll
        for (int i = 0; i < N; ++i) ss += v[i] * v[i];
    }
    const float inv = rsqrtf(warp_sum(ss) / cols + eps);
    float wv[N];
    for (int c = lane * N; c < cols; c += 32 * N) {
        load_vec(xr + c, v);
        load_vec(w + c, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = v[i] * inv * wv[i];
        store_vec(out + (long long)row * cols + c, v);
    }
}

// residual[r] = x[r] + residual[r] (in place, in the residual's type R); out[r] = rms_norm(residual[r]) * w.
template <typename T, typename R>
__global__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, R* __restrict__ residual,
                             const T* __restrict__ w, int rows, int cols, float eps) {
    constexpr int N = Vec<T>::N;
    static_assert(N % Vec<R>::N == 0, "R is at least as wide as T");
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long base = (long long)row * cols;
    float ss = 0.f, a[N], b[N];
    constexpr int M = Vec<R>::N;  // residual elements per 16 bytes
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
    for (int c = lane * N; c < cols; c += 32 * N) {
#pragma unroll
        for (int j = 0; j < N; j += M) load_vec(residual + base + c + j, b + j);  // what this lane wrote
        load_vec(w + c, a);
#pragma unroll
        for (int i = 0; i < N; ++i) b[i] = b[i] * inv * a[i];
        store_vec(out + base + c, b);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void rms_norm<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int, int, long long, float);
template __global__ void add_rms_norm<__half, __half>(__half*, const __half*, __half*, const __half*, int, int, float);
template __global__ void add_rms_norm<__nv_bfloat16, float>(__nv_bfloat16*, const __nv_bfloat16*, float*, const __nv_bfloat16*, int, int, float);
template __global__ void add_rms_norm<float, float>(float*, const float*, float*, const float*, int, int, float);
#endif

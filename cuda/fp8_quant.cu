// FP8 weights (quantization="fp8", cupaged/layers/fp8_linear.py is the NumPy twin): rows quantized to e4m3 with
// one float32 scale each, and the scaling of the cuBLASLt FP8 GEMM's output.
#include "common.cuh"
using namespace cupaged;

constexpr float FP8_MAX = 448.f;
constexpr float FP8_MIN_AMAX = 1e-30f;  // a zero row gets a finite scale (and all-zero codes)

// Eight consecutive elements (16-byte aligned) as floats, and back.
template <typename T> __device__ __forceinline__ void load8(const T* p, float* out) {
#pragma unroll
    for (int j = 0; j < 8; j += Vec<T>::N) load_vec(p + j, out + j);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float* in) {
#pragma unroll
    for (int j = 0; j < 8; j += Vec<T>::N) store_vec(p + j, in + j);
}

// One CTA per row of x [rows, cols] (rows `x_stride` elements apart, cols % 8 == 0): amax = max |x|, then
// codes = e4m3(x * (448 / amax)) and scale = amax / 448, so x ~= decode(codes) * scale. Per-output-channel
// weight scales at load and per-token activation scales at run time are the same operation on rows.
// IEEE division (NVRTC's default -prec-div=true) and one rounded multiply: bit-identical to the NumPy twin.
template <typename T>
__global__ void quantize_rows_fp8(const T* __restrict__ x, unsigned char* __restrict__ codes,
                                  float* __restrict__ scales, int cols, long long x_stride) {
    const long long row = blockIdx.x;
    const T* src = x + row * x_stride;
    float amax = 0.f;
    for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
        float v[8];
        load8(src + c, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    __shared__ float warp_amax[32];
    amax = warp_max(amax);
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    if (threadIdx.x < 32) {
        amax = threadIdx.x < (blockDim.x + 31) / 32 ? warp_amax[threadIdx.x] : 0.f;
        amax = warp_max(amax);
        if (threadIdx.x == 0) warp_amax[0] = amax;
    }
    __syncthreads();
    const float a = fmaxf(warp_amax[0], FP8_MIN_AMAX);
    const float inv = FP8_MAX / a;
    if (threadIdx.x == 0) scales[row] = a / FP8_MAX;
    unsigned char* dst = codes + row * cols;
    for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
        float v[8];
        load8(src + c, v);
        uint2 q;
        q.x = float2_to_e4m3x2(v[0] * inv, v[1] * inv) | (unsigned)float2_to_e4m3x2(v[2] * inv, v[3] * inv) << 16;
        q.y = float2_to_e4m3x2(v[4] * inv, v[5] * inv) | (unsigned)float2_to_e4m3x2(v[6] * inv, v[7] * inv) << 16;
        *reinterpret_cast<uint2*>(dst + c) = q;
    }
}

// The GEMM ran on codes with alpha = 2^-16 (its output stays well inside fp16's range); d [rows, cols] becomes
// d * row_scale[r] * col_scale[c] * 2^16 in place: the per-token and per-channel scales cuBLASLt's scalar scale
// pointers cannot express on sm_90. One thread per 8 outputs (cols % 8 == 0).
template <typename T>
__global__ void scale_fp8_output(T* __restrict__ d, const float* __restrict__ row_scale,
                                 const float* __restrict__ col_scale, int rows, int cols) {
    const long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8;
    if (i >= (long long)rows * cols) return;
    const int r = i / cols, c = i % cols;
    const float s = row_scale[r] * 65536.f;
    float v[8];
    load8(d + i, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] *= s * col_scale[c + j];
    store8(d + i, v);
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void quantize_rows_fp8<float>(const float*, unsigned char*, float*, int, long long);
template __global__ void quantize_rows_fp8<__half>(const __half*, unsigned char*, float*, int, long long);
template __global__ void quantize_rows_fp8<__nv_bfloat16>(const __nv_bfloat16*, unsigned char*, float*, int, long long);
template __global__ void scale_fp8_output<__half>(__half*, const float*, const float*, int, int);
template __global__ void scale_fp8_output<__nv_bfloat16>(__nv_bfloat16*, const float*, const float*, int, int);
#endif

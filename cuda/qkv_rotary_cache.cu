// From the fused q|k|v projection to what attention needs, in one kernel: the optional q|k|v bias, the optional
// per-head RMSNorm of q and k (Qwen3), rotary on q and k, q written out [T, Hq, D] (contiguous), k and v written
// into the paged cache at slot_mapping (slot -1: not written). At batch 1 the separate kernels (bias, two norms,
// rotary, write_kv) each cost more in launch and tail latency than in work; this is one.
//
// It computes exactly what that sequence of kernels does: every intermediate is rounded to T where they store
// one (after the bias, after the norm, after rotary), and a head's sum of squares is added up in the order of
// norm.cu's warp reduction (lane j's partial sums of chunks j and j + LANES, then the butterfly), so its results
// are bit for bit theirs for head_dim <= 32 x VEC.
//
// qkv [T, (Hq + 2 Hkv) * D], rows qkv_stride elements apart. Heads are taken LANES = D / 2 / VEC threads each
// (a power of two <= 32, so a head's threads are one aligned group of a warp): thread j of a head holds elements
// [j VEC, (j + 1) VEC) and the same of the second half, the pair rotary mixes. VEC = 16 / sizeof(T).
// Grid (tokens, ceil(heads * LANES / blockDim)); whole heads per warp, so groups leave together.
// cos_sin [max_pos, D] float32 (cos | sin), as rotary.cu. Caches: [num_blocks, Hkv, block_size, D] of T, or of
// e4m3 codes (C = cupaged::e4m3) with one scale exponent byte per (token, head) row in k_scale / v_scale, as
// cache.cu's write_kv_fp8 (bit-identical to fp8.quantize_rows of the rotated, T-rounded k and of v).
#include "common.cuh"
using namespace cupaged;

template <typename C> struct HoldsCodes { static constexpr bool value = false; };  // a cache of e4m3 codes?
template <> struct HoldsCodes<e4m3> { static constexpr bool value = true; };

template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// The sum of x over the `lanes` threads of this thread's group (lanes a power of two, the group aligned).
__device__ __forceinline__ float group_sum(float x, int lanes, unsigned mask) {
    for (int o = lanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(mask, x, o);
    return x;
}

__device__ __forceinline__ float group_max(float x, int lanes, unsigned mask) {
    for (int o = lanes / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(mask, x, o));
    return x;
}

template <typename T, typename C, typename W, bool BIAS, bool NORM>
__global__ void qkv_rotary_cache(T* __restrict__ q_out, const T* __restrict__ qkv, long long qkv_stride,
                                 const T* __restrict__ bias, const W* __restrict__ q_norm,
                                 const W* __restrict__ k_norm, float eps, const int* __restrict__ positions,
                                 const float* __restrict__ cos_sin, C* __restrict__ k_cache, C* __restrict__ v_cache,
                                 unsigned char* __restrict__ k_scale, unsigned char* __restrict__ v_scale,
                                 const int* __restrict__ slot_mapping, int num_q_heads, int num_kv_heads,
                                 int head_dim, int block_size) {
    constexpr int VEC = Vec<T>::N;
    constexpr bool FP8 = HoldsCodes<C>::value;
    static_assert(!FP8 || VEC == 8, "FP8 caches hold the K/V of 16-bit models");
    const int t = blockIdx.x, half = head_dim / 2, lanes = half / VEC;
    const int item = blockIdx.y * blockDim.x + threadIdx.x, head = item / lanes, i = (item % lanes) * VEC;
    if (head >= num_q_heads + 2 * num_kv_heads) return;  // whole groups: the shuffles below stay within groups
    const bool is_q = head < num_q_heads, is_v = head >= num_q_heads + num_kv_heads;
    const int slot = is_q ? 0 : slot_mapping[t];
    if (slot < 0) return;
    const int lane = threadIdx.x % 32;
    const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1) << (lane & ~(lanes - 1));

    float x1[VEC], x2[VEC];
    const T* src = qkv + t * qkv_stride + (long long)head * head_dim;
    load_vec(src + i, x1);
    load_vec(src + half + i, x2);
    if constexpr (BIAS) {
        float b1[VEC], b2[VEC];
        load_vec(bias + (long long)head * head_dim + i, b1);
        load_vec(bias + (long long)head * head_dim + half + i, b2);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            x1[j] = round_to<T>(x1[j] + b1[j]);
            x2[j] = round_to<T>(x2[j] + b2[j]);
        }
    }
    if (!is_v) {
        if constexpr (NORM) {
            float ss1 = 0.f, ss2 = 0.f;
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss1 += x1[j] * x1[j];
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss2 += x2[j] * x2[j];
            const float inv = rsqrtf(group_sum(ss1 + ss2, lanes, mask) / head_dim + eps);
            const W* w = is_q ? q_norm : k_norm;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                x1[j] = round_to<T>(x1[j] * inv * to_float(w[i + j]));
                x2[j] = round_to<T>(x2[j] * inv * to_float(w[half + i + j]));
            }
        }
        const float* cs = cos_sin + (long long)positions[t] * head_dim;
        float c[VEC], s[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j += 4) {
            load_vec(cs + i + j, c + j);
            load_vec(cs + half + i + j, s + j);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float o1 = x1[j] * c[j] - x2[j] * s[j], o2 = x2[j] * c[j] + x1[j] * s[j];
            x1[j] = round_to<T>(o1);
            x2[j] = round_to<T>(o2);
        }
        if (is_q) {
            T* dst = q_out + ((long long)t * num_q_heads + head) * head_dim;
            store_vec(dst + i, x1);
            store_vec(dst + half + i, x2);
            return;
        }
    }
    const int kv_head = head - num_q_heads - (is_v ? num_kv_heads : 0);
    const long long row = ((long long)(slot / block_size) * num_kv_heads + kv_head) * block_size + slot % block_size;
    if constexpr (FP8) {
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fmaxf(fabsf(x1[j]), fabsf(x2[j])));
        const unsigned e = scale_exponent(group_max(amax, lanes, mask));
        const float inv = exponent_scale(254u - e);
        unsigned char* dst = reinterpret_cast<unsigned char*>(is_v ? v_cache : k_cache) + row * head_dim;
        *reinterpret_cast<uint2*>(dst + i) = float8_to_e4m3x8(x1, inv);
        *reinterpret_cast<uint2*>(dst + half + i) = float8_to_e4m3x8(x2, inv);
        if (i == 0) (is_v ? v_scale : k_scale)[row] = (unsigned char)e;
    } else {
        T* dst = (is_v ? v_cache : k_cache) + row * head_dim;
        store_vec(dst + i, x1);
        store_vec(dst + half + i, x2);
    }
}

#ifdef CUPAGED_NVCC_CHECK
template __global__ void qkv_rotary_cache<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, false, true>(__nv_bfloat16*, const __nv_bfloat16*, long long, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float, const int*, const float*, __nv_bfloat16*, __nv_bfloat16*, unsigned char*, unsigned char*, const int*, int, int, int, int);
template __global__ void qkv_rotary_cache<__half, e4m3, float, true, true>(__half*, const __half*, long long, const __half*, const float*, const float*, float, const int*, const float*, e4m3*, e4m3*, unsigned char*, unsigned char*, const int*, int, int, int, int);
template __global__ void qkv_rotary_cache<float, float, float, true, false>(float*, const float*, long long, const float*, const float*, const float*, float, const int*, const float*, float*, float*, unsigned char*, unsigned char*, const int*, int, int, int, int);
template __global__ void qkv_rotary_cache<__nv_bfloat16, e4m3, __nv_bfloat16, false, false>(__nv_bfloat16*, const __nv_bfloat16*, long long, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float, const int*, const float*, e4m3*, e4m3*, unsigned char*, unsigned char*, const int*, int, int, int, int);
#endif

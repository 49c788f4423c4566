// Shared helpers for cupaged's kernels: float conversion of the three storage types and 16-byte vectors.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cupaged {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- FP8 e4m3 ("e4m3fn"), the KV cache's compressed storage (cupaged/fp8.py is the NumPy twin) ----
// A cache element type distinct from unsigned char, so kernels can be templated on "the cache holds e4m3 codes".
struct e4m3 { unsigned char bits; };

// Two floats -> two e4m3 codes (lo in the low byte): round to nearest even, saturate to +-448, NaN -> 0x7f.
__device__ __forceinline__ unsigned short float2_to_e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Two e4m3 codes (low byte first) -> __half2 bits, exactly (every e4m3 value is a normal half or zero).
__device__ __forceinline__ unsigned e4m3x2_to_half2(unsigned short codes) {
    unsigned r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(codes));
    return r;
}

// Eight e4m3 codes -> eight halves (16 bytes), in order.
__device__ __forceinline__ uint4 e4m3x8_to_half8(uint2 c) {
    return make_uint4(e4m3x2_to_half2(c.x & 0xffffu), e4m3x2_to_half2(c.x >> 16), e4m3x2_to_half2(c.y & 0xffffu),
                      e4m3x2_to_half2(c.y >> 16));
}

// Eight floats times `inv` -> eight e4m3 codes (8 bytes, the first in the lowest byte).
__device__ __forceinline__ uint2 float8_to_e4m3x8(const float* y, float inv) {
    uint2 codes;
    codes.x = float2_to_e4m3x2(y[0] * inv, y[1] * inv) | (unsigned)float2_to_e4m3x2(y[2] * inv, y[3] * inv) << 16;
    codes.y = float2_to_e4m3x2(y[4] * inv, y[5] * inv) | (unsigned)float2_to_e4m3x2(y[6] * inv, y[7] * inv) << 16;
    return codes;
}

// The float32 power-of-two scale of a biased exponent byte (fp8.exponent_scale).
__device__ __forceinline__ float exponent_scale(unsigned e) { return __int_as_float(e << 23); }

// fp8.scale_exponents: the smallest 2^(e-127) with amax <= 448 * 2^(e-127), e clamped to [1, 142].
__device__ __forceinline__ unsigned scale_exponent(float amax) {
    const unsigned bits = __float_as_uint(amax), biased = (bits >> 23) & 0xffu;
    const int e = (bits & 0x7fffffu) <= 0x600000u ? (int)biased - 8 : (int)biased - 7;
    return (unsigned)min(max(e, 1), 142);
}

// Elements of T in one 16-byte access.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// Load 16 bytes (Vec<T>::N elements) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(v[i]);
}

// Store Vec<T>::N floats as 16 bytes of T.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
    uint4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) v[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }  // NVRTC has no math.h

// 2^x through the special-function unit; ex2.approx(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Tensor-core D += A B, mma.sync m16n8k16 with fp32 accumulation, for T = __half or __nv_bfloat16:
// pack(lo, hi) makes one 32-bit A/B register from two floats; mma takes A as four registers or an array of four.
template <typename T> struct MmaOps;
template <> struct MmaOps<__half> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};
template <> struct MmaOps<__nv_bfloat16> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
    static __device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};
template <typename T> struct Mma : MmaOps<T> {
    using MmaOps<T>::mma;
    static __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        MmaOps<T>::mma(c, a[0], a[1], a[2], a[3], b0, b1);
    }
};

}  // namespace cupaged

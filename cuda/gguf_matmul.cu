// GGUF block-quantized weights used as they are in the file (cupaged/quant.py holds the NumPy reference).
//
// One weight-streaming skeleton, templated over a per-format functor that dequantizes 8 consecutive values of
// a block into registers: `F::dequant8(block, sub, v)` writes values 8*sub .. 8*sub+7 of the block at `block`
// (F::QK values in F::BYTES bytes). Adding a format (or bf16/fp8 weights, issue 20) is one more functor.
//
// - gguf_gemv: out[m, n] = sum_k x[m, k] W[n, k] for M <= MT rows (decode batches). A warp owns one output
//   row n and streams that weight row once, each lane 8 values at a time, for all M activation rows at once
//   (x is small and stays in L1/L2), so each weight byte is read once per call. fp32 accumulation.
// - gguf_dequantize: rows of W (all, or those `row_ids` names: the embedding lookup) to a float type, for the
//   larger-M path (dequantize a layer into a reused buffer, then one cuBLAS GEMM) and for the embedding.
// Rows are `row_bytes` apart (cols / QK blocks each), the layout of a GGUF tensor. Both kernels take the
// output's row stride, so the parts of a fused projection (q|k|v) write their own columns of one output.
#include "common.cuh"

namespace cupaged {
namespace gguf {

__device__ __forceinline__ float f16_at(const unsigned char* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));  // 2-byte aligned in every format
}

__device__ __forceinline__ unsigned u32_at(const unsigned char* p) {  // 2-byte aligned only (Q5_0's qh)
    return p[0] | (p[1] << 8) | (p[2] << 16) | ((unsigned)p[3] << 24);
}

// 32-value formats: sub 0..3; values 0-15 are the low nibbles of qs[0..15], 16-31 the high nibbles.
struct Q4_0 {
    static constexpr int QK = 32, BYTES = 18;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) {
        float d = f16_at(b);
        const unsigned char* qs = b + 2 + 8 * (sub & 1);
        int shift = (sub >> 1) * 4;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = d * (float)(((qs[j] >> shift) & 0xF) - 8);
    }
};

struct Q4_1 {
    static constexpr int QK = 32, BYTES = 20;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) {
        float d = f16_at(b), m = f16_at(b + 2);
        const unsigned char* qs = b + 4 + 8 * (sub & 1);
        int shift = (sub >> 1) * 4;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = d * (float)((qs[j] >> shift) & 0xF) + m;
    }
};

// Q5: bit i of the 32-bit qh is the fifth bit of value i.
template <int QH, bool OFFSET>
__device__ __forceinline__ void q5_values(const unsigned char* b, int sub, float d, float m, float* v) {
    unsigned qh = u32_at(b + QH) >> (8 * sub);
    const unsigned char* qs = b + QH + 4 + 8 * (sub & 1);
    int shift = (sub >> 1) * 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        int q = ((qs[j] >> shift) & 0xF) | (((qh >> j) & 1) << 4);
        v[j] = OFFSET ? d * (float)q + m : d * (float)(q - 16);
    }
}

struct Q5_0 {
    static constexpr int QK = 32, BYTES = 22;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) { q5_values<2, false>(b, sub, f16_at(b), 0.f, v); }
};

struct Q5_1 {
    static constexpr int QK = 32, BYTES = 24;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) {
        q5_values<4, true>(b, sub, f16_at(b), f16_at(b + 2), v);
    }
};

struct Q8_0 {
    static constexpr int QK = 32, BYTES = 34;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) {
        float d = f16_at(b);
        const signed char* qs = reinterpret_cast<const signed char*>(b + 2 + 8 * sub);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = d * (float)qs[j];
    }
};

// Q4_K / Q5_K super-blocks of 256: d, dmin (fp16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32.
// ggml's get_scale_min_k4 without branches (a mask), from three aligned 32-bit loads, so that the GEMV's unrolled
// iterations can issue all their loads together: sub-blocks 0-3 take the low 6 bits of bytes s (scale) and s + 4
// (min); sub-blocks 4-7 the nibbles of byte s + 4 with the top 2 bits of bytes s - 4 (scale) and s (min).
__device__ __forceinline__ void k_scale_min(const unsigned char* sc, int s, int& scale, int& min) {
    const unsigned* word = reinterpret_cast<const unsigned*>(sc);  // block + 4: blocks are 144 or 176 bytes
    const int shift = 8 * (s & 3), high = -(s >> 2);                 // high: all ones for sub-blocks 4-7
    const int a = (word[0] >> shift) & 0xFF, b = (word[1] >> shift) & 0xFF, c = (word[2] >> shift) & 0xFF;
    scale = (((c & 0xF) | ((a >> 6) << 4)) & high) | (a & 63 & ~high);
    min = (((c >> 4) | ((b >> 6) << 4)) & high) | (b & 63 & ~high);
}

// sub 0..31: sub-block s = sub / 4, values 8 (sub % 4) .. +7 of it. Its 4-bit parts are nibble s % 2 of
// qs[32 (s / 2) + i]; Q5_K's fifth bit is bit s of qh[i].
template <bool FIVE>
__device__ __forceinline__ void k_values(const unsigned char* b, int sub, float* v) {
    int s = sub >> 2, i0 = 8 * (sub & 3), scale, min;
    k_scale_min(b + 4, s, scale, min);
    float d = f16_at(b) * (float)scale, dm = f16_at(b + 2) * (float)min;
    const unsigned char* qs = b + (FIVE ? 48 : 16) + 32 * (s >> 1) + i0;
    // 8 bytes at an 8-byte aligned address: block sizes 144 and 176 and the qs offsets are multiples of 8
    uint2 raw = *reinterpret_cast<const uint2*>(qs);
    const unsigned char* q8 = reinterpret_cast<const unsigned char*>(&raw);
    int shift = (s & 1) * 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        int q = (q8[j] >> shift) & 0xF;
        if (FIVE) q |= ((b[16 + i0 + j] >> s) & 1) << 4;
        v[j] = d * (float)q - dm;
    }
}

struct Q4_K {
    static constexpr int QK = 256, BYTES = 144;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) { k_values<false>(b, sub, v); }
};

struct Q5_K {
    static constexpr int QK = 256, BYTES = 176;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) { k_values<true>(b, sub, v); }
};

// Q6_K: ql[128], qh[64], int8 scales[16], d (fp16). Value 128 h + r: low 4 bits are nibble r / 64 of
// ql[64 h + r % 64], high 2 bits are bits 2 (r / 32) of qh[32 h + r % 32]; minus 32, times d * scales[v / 16].
struct Q6_K {
    static constexpr int QK = 256, BYTES = 210;
    __device__ static void dequant8(const unsigned char* b, int sub, float* v) {
        int v0 = 8 * sub, h = v0 >> 7, r = v0 & 127;
        const unsigned char* ql = b + 64 * h + (r & 63);
        const unsigned char* qh = b + 128 + 32 * h + (r & 31);
        int lshift = 4 * (r >> 6), hshift = 2 * (r >> 5);
        float d = f16_at(b + 208) * (float)reinterpret_cast<const signed char*>(b + 192)[v0 >> 4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int q = ((ql[j] >> lshift) & 0xF) | (((qh[j] >> hshift) & 3) << 4);
            v[j] = d * (float)(q - 32);
        }
    }
};

// 8 consecutive activations as floats (16-byte aligned: the caller checks).
__device__ __forceinline__ void load8(const float* p, float* out) { load_vec(p, out); load_vec(p + 4, out + 4); }
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) { load_vec(p, out); }

__device__ __forceinline__ void store8(float* p, const float* in) { store_vec(p, in); store_vec(p + 4, in + 4); }
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* in) { store_vec(p, in); }

}  // namespace gguf
}  // namespace cupaged

using namespace cupaged;

// out[m * ldo + n] = sum_k x[m * ldx + k] * W[n, k], for m < M <= MT and n < rows. One warp per weight row.
template <class F, typename TX, typename TO, int MT>
__global__ void __launch_bounds__(128) gguf_gemv(const unsigned char* __restrict__ w, long long row_bytes,
                                                 const TX* __restrict__ x, long long ldx, TO* __restrict__ out,
                                                 long long ldo, int rows, int cols, int M) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= rows) return;
    const unsigned char* row = w + n * row_bytes;
    constexpr int SUBS = F::QK / 8;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    // A warp streams one row of a few KiB: the loop is unrolled, and its body has no branch (rows past M read
    // row M - 1 and are not written), so that several iterations' loads are in flight at once.
#pragma unroll 8
    for (int c = lane; c < cols / 8; c += 32) {
        float wv[8];
        F::dequant8(row + (c / SUBS) * F::BYTES, c % SUBS, wv);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float xv[8];
            gguf::load8(x + min(m, M - 1) * ldx + 8 * c, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(wv[j], xv[j], acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        float s = warp_sum(acc[m]);
        if (lane == 0 && m < M) out[m * ldo + n] = from_float<TO>(s);
    }
}

// out[i * ldo + k] = W[row_ids ? row_ids[i] : i, k] for i < rows: one thread per 8 values of a row (blockIdx.x
// the values, blockIdx.y the rows, no division).
template <class F, typename TO>
__global__ void gguf_dequantize(const unsigned char* __restrict__ w, long long row_bytes,
                                const int* __restrict__ row_ids, int rows, int cols, TO* __restrict__ out,
                                long long ldo) {
    constexpr int SUBS = F::QK / 8;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols / 8) return;
    for (int i = blockIdx.y; i < rows; i += gridDim.y) {
        const long long src = row_ids ? row_ids[i] : i;
        float v[8];
        F::dequant8(w + src * row_bytes + (c / SUBS) * F::BYTES, c % SUBS, v);
        gguf::store8(out + i * ldo + 8 * c, v);
    }
}

#ifdef CUPAGED_NVCC_CHECK
#define CUPAGED_GGUF_INSTANCES(F)                                                                              \
    template __global__ void gguf_gemv<gguf::F, __nv_bfloat16, __nv_bfloat16, 1>(                              \
        const unsigned char*, long long, const __nv_bfloat16*, long long, __nv_bfloat16*, long long, int, int, int); \
    template __global__ void gguf_gemv<gguf::F, __nv_bfloat16, float, 16>(                                     \
        const unsigned char*, long long, const __nv_bfloat16*, long long, float*, long long, int, int, int);   \
    template __global__ void gguf_gemv<gguf::F, float, float, 8>(                                              \
        const unsigned char*, long long, const float*, long long, float*, long long, int, int, int);           \
    template __global__ void gguf_dequantize<gguf::F, __nv_bfloat16>(                                          \
        const unsigned char*, long long, const int*, int, int, __nv_bfloat16*, long long);                     \
    template __global__ void gguf_dequantize<gguf::F, float>(                                                  \
        const unsigned char*, long long, const int*, int, int, float*, long long);
CUPAGED_GGUF_INSTANCES(Q4_0)
CUPAGED_GGUF_INSTANCES(Q4_1)
CUPAGED_GGUF_INSTANCES(Q5_0)
CUPAGED_GGUF_INSTANCES(Q5_1)
CUPAGED_GGUF_INSTANCES(Q8_0)
CUPAGED_GGUF_INSTANCES(Q4_K)
CUPAGED_GGUF_INSTANCES(Q5_K)
CUPAGED_GGUF_INSTANCES(Q6_K)
#endif

// Weights streamed from [N, K] storage at decode: GGUF blocks as they are in the file (cupaged/quant.py holds the
// NumPy reference), FP8 e4m3 codes with a scale per row, bf16/fp16 values.
//
// - weight_gemv: out[m, n] = sum_k x[m, k] W[n, k] for M <= MT rows (decode batches), every weight byte read
//   once per call; one skeleton templated over a format functor (namespace stream, interface above the kernel).
// - gguf_dequantize: rows of a GGUF W (all, or those `row_ids` names: the embedding lookup) to a float type, for
//   the larger-M path (dequantize a layer into a reused buffer, then one cuBLAS GEMM) and for the embedding,
//   through each format's `F::dequant8(block, sub, v)` (values 8 sub .. 8 sub + 7 of the block at `block`, F::QK
//   values in F::BYTES bytes), which the GEMV also uses for the formats without a streaming functor (Legacy).
// Rows are `row_bytes` apart (cols / QK blocks each, the layout of a GGUF tensor). Both kernels take the
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
// ggml's get_scale_min_k4 without branches (a mask), from the three 32-bit words of the scales, so that the GEMV's unrolled
// iterations can issue all their loads together: sub-blocks 0-3 take the low 6 bits of bytes s (scale) and s + 4
// (min); sub-blocks 4-7 the nibbles of byte s + 4 with the top 2 bits of bytes s - 4 (scale) and s (min).
__device__ __forceinline__ void k_scale_min(unsigned w0, unsigned w1, unsigned w2, int s, int& scale, int& min) {
    const int shift = 8 * (s & 3), high = -(s >> 2);  // high: all ones for sub-blocks 4-7
    const int a = (w0 >> shift) & 0xFF, b = (w1 >> shift) & 0xFF, c = (w2 >> shift) & 0xFF;
    scale = (((c & 0xF) | ((a >> 6) << 4)) & high) | (a & 63 & ~high);
    min = (((c >> 4) | ((b >> 6) << 4)) & high) | (b & 63 & ~high);
}

// sub 0..31: sub-block s = sub / 4, values 8 (sub % 4) .. +7 of it. Its 4-bit parts are nibble s % 2 of
// qs[32 (s / 2) + i]; Q5_K's fifth bit is bit s of qh[i].
template <bool FIVE>
__device__ __forceinline__ void k_values(const unsigned char* b, int sub, float* v) {
    int s = sub >> 2, i0 = 8 * (sub & 3), scale, min;
    const unsigned* word = reinterpret_cast<const unsigned*>(b + 4);  // blocks are 144 or 176 bytes: aligned
    k_scale_min(word[0], word[1], word[2], s, scale, min);
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

// ---- the weight-streaming GEMV's formats (see weight_gemv below for the functor interface) ----
namespace stream {

// Weights are read once per call: loads that bypass L1 (read-only path) leave it to x.
__device__ __forceinline__ uint4 load16(const unsigned char* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ unsigned load4(const unsigned char* p) {
    unsigned r;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// The four bytes of w (each < 256) as exact floats: 2^23 + byte built by one byte permute, less 2^23 (cheaper than
// four integer-to-float conversions, the bottleneck of 4-bit formats at batch 1).
__device__ __forceinline__ void bytes4(unsigned w, float* q, float bias = 8388608.f) {
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + j)) - bias;
}

// Eight signed bytes (two words) as floats: the sign bit flipped makes them byte + 128.
__device__ __forceinline__ void int8x8(unsigned lo, unsigned hi, float* q) {
    bytes4(lo ^ 0x80808080u, q, 8388736.f);
    bytes4(hi ^ 0x80808080u, q + 4, 8388736.f);
}

__device__ __forceinline__ float half_bits(unsigned bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

// Decoded values are w = a * q + b per group of 8 (q exact small numbers where the format has them): the GEMV
// multiplies q by x and applies a (and b times the sum of x, OFFSET formats) once per 8 values.

// bf16 / fp16 weights: 8 values per 16-byte load.
template <typename T>
struct Dense {
    static constexpr int VALUES = 8, UNROLL = 4;
    static constexpr bool OFFSET = false;
    using Raw = uint4;
    __device__ static Raw load(const unsigned char* row, int unit) { return load16(row + 16 * unit); }
    __device__ static void decode(const Raw& raw, int, float* q, float& a, float& b) {
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[j] = to_float(v[j]);
        a = 1.f, b = 0.f;
    }
};

// FP8 e4m3 codes (fp8_linear.py): 16 per 16-byte load, converted by pairs in hardware (sm_89+); the per-row
// scale is the kernel's row_scales.
struct Fp8 {
    static constexpr int VALUES = 16, UNROLL = 4;
    static constexpr bool OFFSET = false;
    using Raw = uint4;
    __device__ static Raw load(const unsigned char* row, int unit) { return load16(row + 16 * unit); }
    __device__ static void decode(const Raw& raw, int part, float* q, float& a, float& b) {
        const unsigned* words = reinterpret_cast<const unsigned*>(&raw);
        uint4 h = e4m3x8_to_half8(make_uint2(words[2 * part], words[2 * part + 1]));
        const __half2* h2 = reinterpret_cast<const __half2*>(&h);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 f = __half22float2(h2[j]);
            q[2 * j] = f.x, q[2 * j + 1] = f.y;
        }
        a = 1.f, b = 0.f;
    }
};

// Q8_0, a block (34 bytes, 2-byte aligned) per unit: nine aligned 32-bit loads cover it (the last may reach 2
// bytes past the block, inside the same aligned word), realigned with funnel shifts.
struct Q8_0 {
    static constexpr int VALUES = 32, UNROLL = 2;
    static constexpr bool OFFSET = false;
    struct Raw { unsigned w[9]; unsigned shift; };
    __device__ static Raw load(const unsigned char* row, int unit) {
        const unsigned char* p = row + 34 * unit;
        const unsigned char* aligned = reinterpret_cast<const unsigned char*>(reinterpret_cast<size_t>(p) & ~size_t(3));
        Raw r;
#pragma unroll
        for (int i = 0; i < 9; ++i) r.w[i] = load4(aligned + 4 * i);
        r.shift = 8 * (unsigned)(p - aligned);  // 0 or 16
        return r;
    }
    __device__ static void decode(const Raw& r, int part, float* q, float& a, float& b) {
        // the block's byte k is byte (k + shift / 8) of the words: d is bytes 0-1, qs[i] byte 2 + i
        const unsigned lo = __funnelshift_rc(r.w[2 * part], r.w[2 * part + 1], 16 + r.shift);
        const unsigned hi = __funnelshift_rc(r.w[2 * part + 1], r.w[2 * part + 2], 16 + r.shift);
        int8x8(lo, hi, q);
        a = half_bits(r.w[0] >> r.shift), b = 0.f;
    }
};

// Q4_K, a pair of sub-blocks (64 values sharing 32 bytes of qs) per unit: the block's 16-byte head (d, dmin,
// scales) and the pair's qs, three 16-byte loads (144-byte blocks keep 16-byte alignment). The head is loaded by
// the four lanes of a block in one instruction: one memory access.
struct Q4_K {
    static constexpr int VALUES = 64, UNROLL = 2;
    static constexpr bool OFFSET = true;
    struct Raw { uint4 head, q0, q1; int pair; };
    __device__ static Raw load(const unsigned char* row, int unit) {
        const unsigned char* block = row + 144 * (unit >> 2);
        const int pair = unit & 3;
        return {load16(block), load16(block + 16 + 32 * pair), load16(block + 32 + 32 * pair), pair};
    }
    // part p: sub-block 2 pair + p / 4 (low nibbles, then high), values 8 (p % 4) .. + 7 of it
    __device__ static void decode(const Raw& r, int part, float* q, float& a, float& b) {
        int scale, min;
        gguf::k_scale_min(r.head.y, r.head.z, r.head.w, 2 * r.pair + (part >> 2), scale, min);
        a = half_bits(r.head.x) * (float)scale, b = -half_bits(r.head.x >> 16) * (float)min;
        const int i = 2 * (part & 3), shift = 4 * (part >> 2);
        const uint4& qs16 = i < 4 ? r.q0 : r.q1;  // the 16 of the pair's 32 qs bytes holding words i, i + 1
        const unsigned* words = reinterpret_cast<const unsigned*>(&qs16);
        bytes4((words[i & 3] >> shift) & 0x0F0F0F0Fu, q);
        bytes4((words[(i & 3) + 1] >> shift) & 0x0F0F0F0Fu, q + 4);
    }
};

// Any GGUF format by its dequant8 (8 values a unit, loaded while decoding): the formats without a streaming
// functor of their own.
template <class G>
struct Legacy {
    static constexpr int VALUES = 8, UNROLL = 8;
    static constexpr bool OFFSET = false;
    struct Raw { const unsigned char* block; int sub; };
    __device__ static Raw load(const unsigned char* row, int unit) {
        return {row + (unit / (G::QK / 8)) * G::BYTES, unit % (G::QK / 8)};
    }
    __device__ static void decode(const Raw& r, int, float* q, float& a, float& b) {
        G::dequant8(r.block, r.sub, q);
        a = 1.f, b = 0.f;
    }
};

}  // namespace stream
}  // namespace cupaged

using namespace cupaged;

// ---- the weight-streaming GEMV: out[m * ldo + n] = scale[n] * sum_k x[m * ldx + k] * W[n, k] ----
// For m < M <= MT (decode batches) and n < rows. W is [N, K]: each output row's K weights are `row_bytes` of
// contiguous storage, in a format a functor F describes by units of F::VALUES consecutive values of a row:
//   F::Raw                      the registers one unit occupies before decoding;
//   F::load(row, unit) -> Raw   all the unit's global loads (16-byte ones where the layout allows), no arithmetic;
//   F::decode(raw, part, v)     values 8 part .. 8 part + 7 of the unit as floats (part < VALUES / 8);
//   F::UNROLL                   units a lane loads per row before decoding any (bytes in flight per lane).
// A warp owns R rows; a lane issues the loads of UNROLL units of each of them, then decodes and multiplies them
// with x (read straight from global memory: a few KiB that stay in L1/L2, reused by the R rows), so R * UNROLL
// independent loads are in flight per lane with no shared memory, no __syncthreads and no split-K: the N / (4 R)
// CTAs of a layer (N >= 1024) fill the GPU. fp32 accumulation, warp-shuffle reduction, the row scale (FP8) once
// at the end. Rows past M read row M - 1 of x and are not written, so the loop body has no branch on M.
template <class F, typename TX, typename TO, int MT, int R>
__global__ void __launch_bounds__(128) weight_gemv(const unsigned char* __restrict__ w, long long row_bytes,
                                                   const float* __restrict__ row_scales, const TX* __restrict__ x,
                                                   long long ldx, TO* __restrict__ out, long long ldo, int rows,
                                                   int cols, int M) {
    constexpr int PARTS = F::VALUES / 8, U = F::UNROLL;
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (n0 >= rows) return;
    const unsigned char* row[R];
#pragma unroll
    for (int r = 0; r < R; ++r) row[r] = w + min(n0 + r, rows - 1) * row_bytes;  // rows past N: a repeat, unwritten
    const int units = cols / F::VALUES;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    for (int base = lane; base < units; base += 32 * U) {
        typename F::Raw raw[R][U];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (base + 32 * u < units) raw[r][u] = F::load(row[r], base + 32 * u);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int unit = base + 32 * u;
            if (unit >= units) break;
#pragma unroll
            for (int part = 0; part < PARTS; ++part) {
                float q[R][8], a[R], b[R];
#pragma unroll
                for (int r = 0; r < R; ++r) F::decode(raw[r][u], part, q[r], a[r], b[r]);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    float xv[8], xsum = 0.f;
                    gguf::load8(x + min(m, M - 1) * ldx + (long long)unit * F::VALUES + 8 * part, xv);
                    if (F::OFFSET) {
#pragma unroll
                        for (int j = 0; j < 8; ++j) xsum += xv[j];
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float dot = 0.f;
#pragma unroll
                        for (int j = 0; j < 8; ++j) dot = fmaf(q[r][j], xv[j], dot);
                        acc[r][m] = fmaf(a[r], dot, acc[r][m]);
                        if (F::OFFSET) acc[r][m] = fmaf(b[r], xsum, acc[r][m]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float scale = row_scales != nullptr && n0 + r < rows ? row_scales[n0 + r] : 1.f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float s = warp_sum(acc[r][m]);
            if (lane == 0 && m < M && n0 + r < rows) out[m * ldo + n0 + r] = from_float<TO>(s * scale);
        }
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
#define CUPAGED_GEMV_INSTANCES(F)                                                                              \
    template __global__ void weight_gemv<F, __nv_bfloat16, __nv_bfloat16, 1, 2>(                                \
        const unsigned char*, long long, const float*, const __nv_bfloat16*, long long, __nv_bfloat16*, long long, \
        int, int, int);                                                                                        \
    template __global__ void weight_gemv<F, __nv_bfloat16, float, 16, 2>(                                       \
        const unsigned char*, long long, const float*, const __nv_bfloat16*, long long, float*, long long, int, \
        int, int);                                                                                             \
    template __global__ void weight_gemv<F, float, float, 8, 1>(                                                \
        const unsigned char*, long long, const float*, const float*, long long, float*, long long, int, int, int);
#define CUPAGED_GGUF_INSTANCES(F)                                                                              \
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
CUPAGED_GEMV_INSTANCES(stream::Legacy<gguf::Q4_0>)
CUPAGED_GEMV_INSTANCES(stream::Legacy<gguf::Q6_K>)
CUPAGED_GEMV_INSTANCES(stream::Q8_0)
CUPAGED_GEMV_INSTANCES(stream::Q4_K)
CUPAGED_GEMV_INSTANCES(stream::Fp8)
CUPAGED_GEMV_INSTANCES(stream::Dense<__nv_bfloat16>)
CUPAGED_GEMV_INSTANCES(stream::Dense<__half>)
#endif

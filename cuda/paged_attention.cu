// Paged decode attention: one query token per sequence against its K/V in the paged cache
// ([num_blocks, num_kv_heads, block_size, HEAD_DIM] per layer, "HND"), split-k over long contexts.
//
// Work decomposition (both kernels). A CTA takes one sequence, one KV head with HEADS of its query heads (the whole
// GQA group when it has 8 or fewer heads), and one partition of `partition` consecutive tokens: every K/V tile is
// read once and used by all HEADS query heads. Grid: x = kv head * head_chunks + chunk (the chunks of one KV
// head run side by side and share the tiles through L2), y = partition (looping by gridDim.y when the grid has
// fewer than the context needs), z = sequence. The host picks `partition` so that sequences x KV heads x
// partitions fill the SMs, and passes it through device memory (a CUDA graph replays with the step's value). A sequence whose context fits one partition gets its
// output written directly; otherwise each CTA writes an unnormalised partial output with its running max (log2
// domain) and sum, and paged_decode_reduce combines the partitions (FlashInfer / vLLM v2 style).
//
// paged_decode_tc (fp16, bf16; HEAD_DIM 64/128/256): tensor cores (mma.sync m16n8k16, fp32 accumulation).
// 4 warps; warp w takes the 16-token steps w, w+4, ... of the partition (SUB of them at a time, see DecodeTypes),
// with its own online softmax, and the 4 warps are merged through shared memory at the end (no barrier in the main
// loop). Per step a lane issues all its 16-byte loads (2 K rows, 4 V rows) before any math:
//   S[h][t] = Q K^T    A = Q (rows = the HEADS query heads, padded to 16 with zeros), B = K^T straight from the
//                      K rows' 16-byte loads (lane l holds token l/4); the head_dim order inside each k-step is
//                      permuted so that the loads stay coalesced; Q is loaded in the same permuted order.
//   online softmax     on the accumulator fragment (lane holds head l/4, tokens 2(l%4)+{0,1}, +8): max over the
//                      4 lanes of a head by shuffles, p = exp2(s * scale * log2 e - m)
//   O^T[d][h] += V^T P^T  A = V^T built from the V rows with byte permutes (lane loads tokens 2(l%4)+{0,1,8,9}),
//                      B = P^T, which is exactly the S fragment re-packed to 16 bits: P never leaves registers.
// FP8 cache (e4m3 codes, one power-of-two scale per token and KV head, see cupaged/fp8.py): the same kernel with
// C = e4m3 reads half the bytes, 16 codes a load; a warp takes 32 tokens a step (the bytes in flight of the 16-bit
// cache's 16); codes become fp16 (K, hardware cvt) / bf16 (V, bit moves) in registers (DecodeTypes), K's scales
// multiply the scores and V's the softmax weights before P V.
// paged_decode_simt (any of fp32/fp16/bf16; head_dim/vector a power of two <= 32): CUDA cores; the fallback for
// fp32 and for the shapes the tensor-core kernel does not take. Scores go through shared memory.
#include "common.cuh"
using namespace cupaged;

namespace {

constexpr int THREADS = 128, WARPS = THREADS / 32, STEP = 16;

// 16 bytes from global memory that this kernel reads once: no L1 allocation.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// The same with the hint that the L2 fetch the whole 256-byte line from DRAM on a miss (the rest of the line is the
// rest of this row or the next rows of the block, which the warp asks for at once: fewer, larger DRAM requests).
// FP8 cache only: it came with the FP8 rework, which was measured with it; on the 16-bit cache it went with a
// 5-9% loss (H200, with the single-launch combine also there), so that path keeps the plain load.
__device__ __forceinline__ uint4 ld_stream_l2line(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ uint2 ld_stream8_l2line(const void* p) {
    uint2 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

// The tensor-core kernel's element types and fragment builders. The cache holds C: T itself (Q K^T and P V in T),
// or e4m3 codes. A lane loads KW consecutive elements of a K row (16 bytes) and VW of a V row per access.
//   16-bit: the loaded words are the mma registers; a V m-tile takes one word of each of its 4 tokens. 16 tokens
//   a warp step (SUB = 1: 2 steps at once needed ~200 registers, 2 CTAs an SM, and measured no faster).
//   e4m3: Q K^T runs in fp16 (every e4m3 value is an exact half: 1 cvt per pair; Q is rounded to fp16 once,
//   exact for |q| in [6e-5, 65504]); P V in bf16 straight from the codes' bits: sign and the 7 other bits moved
//   into a bf16 (2 shifts / masks per pair, no cvt), which is the code's value times 2^-120 exactly (e4m3
//   subnormals become bf16 subnormals). Each token's P carries its V scale times 2^112, which bf16 holds for
//   every scale however small (fp16 P would underflow); the accumulator is then 2^-8 times the output, undone
//   once at the end (OUT_SCALE). K's scales multiply the fp32 scores. 32 tokens a step: the same bytes in
//   flight per warp as the 16-bit cache's 16, and half the softmax work per byte.
template <typename T, typename C, int HEAD_DIM> struct DecodeTypes {
    using QK = T;
    using PV = T;
    static constexpr bool FP8 = false;
    static constexpr int KW = 8, VW = 8, SUB = 1;
    static constexpr float OUT_SCALE = 1.f;
    // the two B registers of k-step ks from one 16-byte K load (4 words)
    static __device__ __forceinline__ void k_step(const unsigned* w, int ks, unsigned& b0, unsigned& b1) {
        b0 = w[2 * ks];
        b1 = w[2 * ks + 1];
    }
    // A registers of m-tile jj (head_dim entries 2 jj + {0: row g, 1: row g + 8} of the lane's VW) from the V
    // words of tokens 2 q4 + {0, 1, 8, 9}
    static __device__ __forceinline__ void v_tile(unsigned* a, const unsigned* v0, const unsigned* v1,
                                                  const unsigned* v2, const unsigned* v3, int jj) {
        a[0] = __byte_perm(v0[jj], v1[jj], 0x5410);
        a[1] = __byte_perm(v0[jj], v1[jj], 0x7632);
        a[2] = __byte_perm(v2[jj], v3[jj], 0x5410);
        a[3] = __byte_perm(v2[jj], v3[jj], 0x7632);
    }
};
template <typename T, int HEAD_DIM> struct DecodeTypes<T, e4m3, HEAD_DIM> {
    using QK = __half;
    using PV = __nv_bfloat16;
    static constexpr bool FP8 = true;
    static constexpr int KW = 16, VW = HEAD_DIM % 128 == 0 ? 16 : 8, SUB = HEAD_DIM <= 128 ? 2 : 1;
    static constexpr float OUT_SCALE = 256.f;
    static __device__ __forceinline__ void k_step(const unsigned* w, int ks, unsigned& b0, unsigned& b1) {
        b0 = e4m3x2_to_half2(w[ks] & 0xffffu);
        b1 = e4m3x2_to_half2(w[ks] >> 16);
    }
    // bf16x2 (times 2^-120) of codes in bytes 0 and 2 of x, and of those in bytes 1 and 3
    static __device__ __forceinline__ unsigned bf16_even(unsigned x) {
        return ((x << 8) & 0x80008000u) | ((x << 4) & 0x07f007f0u);
    }
    static __device__ __forceinline__ unsigned bf16_odd(unsigned x) {
        return (x & 0x80008000u) | ((x >> 4) & 0x07f007f0u);
    }
    // a word holds 4 entries of a token's row: m-tiles 2w (entries 0, 1) and 2w + 1 (entries 2, 3)
    static __device__ __forceinline__ void v_tile(unsigned* a, const unsigned* v0, const unsigned* v1,
                                                  const unsigned* v2, const unsigned* v3, int jj) {
        const unsigned sel = jj & 1 ? 0x7632 : 0x5410, w = jj / 2;
        const unsigned x = __byte_perm(v0[w], v1[w], sel), y = __byte_perm(v2[w], v3[w], sel);
        a[0] = bf16_even(x);
        a[1] = bf16_odd(x);
        a[2] = bf16_even(y);
        a[3] = bf16_odd(y);
    }
};

// 4 (16 bytes) or 2 (8 bytes, FP8 only) words of a row that this kernel reads once; FP8: whole L2 lines
template <int WORDS, bool FP8> __device__ __forceinline__ void ld_words(const void* p, unsigned* w) {
    if constexpr (WORDS == 4) {
        const uint4 v = FP8 ? ld_stream_l2line(p) : ld_stream(p);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {
        static_assert(WORDS == 2 && FP8, "8-byte accesses: FP8 only");
        const uint2 v = ld_stream8_l2line(p);
        w[0] = v.x; w[1] = v.y;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core decode kernel. block_size = 1 << bs_log2. Dynamic shared memory: (partition >> bs_log2) + 2 ints.
// C: the cache's element type (T, or e4m3 with per-row scale exponents k_scale / v_scale [blocks, Hkv, bs]).
template <typename T, typename C, int HEAD_DIM, int HEADS>
__device__ __forceinline__ void
decode_tc_split(T* __restrict__ out, float* __restrict__ part_out, float2* __restrict__ part_ml,
                const T* __restrict__ q, long long q_stride, const C* __restrict__ k_cache,
                const C* __restrict__ v_cache, const unsigned char* __restrict__ k_scale,
                const unsigned char* __restrict__ v_scale, const int* __restrict__ block_tables, int max_blocks,
                int seq_len, int num_kv_heads, int group, int head_chunks, int bs_log2,
                int partition, int max_splits, float scale_log2, int split) {
    using Types = DecodeTypes<T, C, HEAD_DIM>;
    using QK = typename Types::QK;
    using PV = typename Types::PV;
    static_assert(HEAD_DIM % 64 == 0 && HEADS >= 1 && HEADS <= 8, "HEAD_DIM in 64/128/256, up to 8 heads a CTA");
    constexpr int KW = Types::KW, VW = Types::VW, SUB = Types::SUB, WSTEP = SUB * STEP;
    constexpr int KL = HEAD_DIM / (4 * KW);                   // 16-byte K loads a lane makes per token row
    constexpr int VC = HEAD_DIM / (8 * VW);                   // V loads a lane makes per token row ...
    constexpr int VWORDS = VW * (int)sizeof(C) / 4;           // ... of this many words
    constexpr int VT = VW / 2, KSL = KW / 4;                  // m-tiles per V load, k-steps per K load
    constexpr int MTILES = HEAD_DIM / 16;
    constexpr bool V_EARLY = HEAD_DIM * (int)sizeof(C) * SUB <= 256;  // registers for K and V loads at once
    const int kvh = blockIdx.x / head_chunks, chunk = blockIdx.x % head_chunks;
    const int b = blockIdx.z, start = split * partition, end = min(start + partition, seq_len);
    const bool single = partition >= seq_len;
    const int head0 = kvh * group + chunk * HEADS, num_heads = num_kv_heads * group;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, q4 = lane % 4;
    const int bs = 1 << bs_log2, first_block = start >> bs_log2;
    const int num_table = ((end - 1) >> bs_log2) - first_block + 1;

    extern __shared__ int s_table[];                          // physical blocks of this partition
    __shared__ float s_acc[WARPS][HEADS][HEAD_DIM + 4];       // per-warp partial outputs, merged at the end
    __shared__ float s_m[WARPS][HEADS], s_l[WARPS][HEADS];

    const int* table = block_tables + (long long)b * max_blocks + first_block;
    for (int i = tid; i < num_table; i += THREADS) s_table[i] = table[i];

    // Q fragment rows: lane holds head g's entries (4 i + q4) KW + 2 r + {0, 1} in qa[i][r] (the K rows' order)
    unsigned qa[KL][KW / 2];
#pragma unroll
    for (int i = 0; i < KL; ++i)
#pragma unroll
        for (int h = 0; h < KW / 8; ++h) {
            uint4 v = make_uint4(0, 0, 0, 0);
            if (g < HEADS) v = *reinterpret_cast<const uint4*>(q + b * q_stride + (long long)(head0 + g) * HEAD_DIM
                                                               + (4 * i + q4) * KW + 8 * h);
            unsigned* r = qa[i] + 4 * h;
            r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
            if constexpr (Types::FP8) {  // Q in QK = fp16 (a no-op round trip when T is fp16)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const T* pair = reinterpret_cast<const T*>(&r[e]);
                    r[e] = Mma<QK>::pack(to_float(pair[0]), to_float(pair[1]));
                }
            }
        }
    __syncthreads();

    const long long block_stride = (long long)num_kv_heads * bs * HEAD_DIM;
    const long long head_offset = (long long)kvh * bs * HEAD_DIM;
    auto row = [&](const C* cache, int t) {
        return cache + s_table[(t >> bs_log2) - first_block] * block_stride + head_offset
               + (long long)(t & (bs - 1)) * HEAD_DIM;
    };

    float acc[MTILES][4];
#pragma unroll
    for (int j = 0; j < MTILES; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m_run = neg_inf(), l_run = 0.f;  // head g's running max (log2 domain) and this lane's share of the sum

    for (int base = start + warp * WSTEP; base < end; base += WARPS * WSTEP) {  // warp-uniform bounds
        // ---- loads of sub-step u (tokens base + 16 u ...): K rows + g and + 8 + g; V rows + 2 q4 + {0, 1, 8, 9}
        unsigned kr[SUB][2][KL][4], vr[SUB][4][VC][VWORDS];
#pragma unroll
        for (int u = 0; u < SUB; ++u)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int t = base + STEP * u + nt * 8 + g;
                if (t < end) {
                    const C* p = row(k_cache, t);
#pragma unroll
                    for (int i = 0; i < KL; ++i) ld_words<4, Types::FP8>(p + (4 * i + q4) * KW, kr[u][nt][i]);
                } else {
#pragma unroll
                    for (int i = 0; i < KL; ++i)
#pragma unroll
                        for (int w = 0; w < 4; ++w) kr[u][nt][i][w] = 0u;
                }
            }
        auto load_v = [&]() {
#pragma unroll
            for (int u = 0; u < SUB; ++u)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int t = base + STEP * u + 2 * q4 + (r & 1) + (r >> 1) * 8;
                    if (t < end) {  // a token past the end is never read: stale cache slots may hold NaN
                        const C* p = row(v_cache, t);
#pragma unroll
                        for (int c = 0; c < VC; ++c) ld_words<VWORDS, Types::FP8>(p + (8 * c + g) * VW, vr[u][r][c]);
                    } else {
#pragma unroll
                        for (int c = 0; c < VC; ++c)
#pragma unroll
                            for (int w = 0; w < VWORDS; ++w) vr[u][r][c][w] = 0u;
                    }
                }
        };
        // FP8: the scales of this lane's score columns, tokens base + 16 u + 8 nt + 2 q4 + {0, 1} (one block: bs >= 2)
        float ks[SUB][2][2], vs[SUB][2][2];
        if constexpr (Types::FP8) {
#pragma unroll
            for (int u = 0; u < SUB; ++u)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const int t = base + STEP * u + nt * 8 + 2 * q4;
                    unsigned kb = 0, vb = 0;
                    if (t < end) {
                        const long long at = s_table[(t >> bs_log2) - first_block] * ((long long)num_kv_heads << bs_log2)
                                             + ((long long)kvh << bs_log2) + (t & (bs - 1));
                        kb = *reinterpret_cast<const unsigned short*>(k_scale + at);
                        vb = *reinterpret_cast<const unsigned short*>(v_scale + at);
                    }
#pragma unroll
                    for (int e = 0; e < 2; ++e) {  // a token past the end gets 0 (its byte may be any stale value)
                        const bool in = t + e < end;
                        ks[u][nt][e] = in ? exponent_scale((kb >> (8 * e)) & 0xffu) : 0.f;
                        vs[u][nt][e] = in ? exponent_scale(((vb >> (8 * e)) & 0xffu) + 112u) : 0.f;  // see DecodeTypes
                    }
                }
        }
        if constexpr (V_EARLY) load_v();  // all of the step's loads in flight at once
        // ---- S = Q K^T: two n-tiles of 8 tokens per sub-step ----
        float s[SUB][2][4];
#pragma unroll
        for (int u = 0; u < SUB; ++u)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                s[u][nt][0] = s[u][nt][1] = s[u][nt][2] = s[u][nt][3] = 0.f;
#pragma unroll
                for (int i = 0; i < KL; ++i)
#pragma unroll
                    for (int k = 0; k < KSL; ++k) {
                        unsigned b0, b1;
                        Types::k_step(kr[u][nt][i], k, b0, b1);
                        Mma<QK>::mma(s[u][nt], qa[i][2 * k], 0u, qa[i][2 * k + 1], 0u, b0, b1);
                    }
            }
        // lane holds S[head g][token base + 16 u + 8 nt + 2 q4 + e] in s[u][nt][e], e = 0, 1 (2, 3: padding rows)
        float mx = neg_inf();
#pragma unroll
        for (int u = 0; u < SUB; ++u)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int t = base + STEP * u + nt * 8 + 2 * q4 + e;
                    float sc = scale_log2;
                    if constexpr (Types::FP8) sc *= ks[u][nt][e];
                    s[u][nt][e] = t < end ? s[u][nt][e] * sc : neg_inf();
                    mx = fmaxf(mx, s[u][nt][e]);
                }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run, mx);  // finite: every step holds at least one token
        const float alpha = fast_exp2(m_run - m_new);
        m_run = m_new;
        float p[SUB][2][2];
        l_run *= alpha;
#pragma unroll
        for (int u = 0; u < SUB; ++u)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                p[u][nt][0] = fast_exp2(s[u][nt][0] - m_new);
                p[u][nt][1] = fast_exp2(s[u][nt][1] - m_new);
                l_run += p[u][nt][0] + p[u][nt][1];
            }
        // the accumulator holds heads 2 q4 and 2 q4 + 1: their rescaling factors live in lanes 8 q4 and 8 q4 + 4
        const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * q4);
        const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * q4 + 4);
        unsigned pb[SUB][2];
#pragma unroll
        for (int u = 0; u < SUB; ++u)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                if constexpr (Types::FP8) {  // P V with each token's V scale (l_run above keeps the plain p)
                    p[u][nt][0] *= vs[u][nt][0];
                    p[u][nt][1] *= vs[u][nt][1];
                }
                pb[u][nt] = Mma<PV>::pack(p[u][nt][0], p[u][nt][1]);
            }

        if constexpr (!V_EARLY) load_v();  // head_dim 256: registers allow only K or V ahead of the math
        // ---- O^T += V^T P^T: m-tile j covers head_dim entries VW (8 (j / VT) + g) + 2 (j % VT) + {0 (row g), 1}
#pragma unroll
        for (int j = 0; j < MTILES; ++j) {
            const int c = j / VT, jj = j % VT;
            acc[j][0] *= alpha0; acc[j][1] *= alpha1; acc[j][2] *= alpha0; acc[j][3] *= alpha1;
#pragma unroll
            for (int u = 0; u < SUB; ++u) {
                unsigned a[4];
                Types::v_tile(a, vr[u][0][c], vr[u][1][c], vr[u][2][c], vr[u][3][c], jj);
                Mma<PV>::mma(acc[j], a, pb[u][0], pb[u][1]);
            }
        }
    }

    // ---- merge the warps: each writes its (m, l, O) for heads < HEADS ----
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    if (q4 == 0 && g < HEADS) { s_m[warp][g] = m_run; s_l[warp][g] = l_run; }
#pragma unroll
    for (int j = 0; j < MTILES; ++j) {
        const int d = VW * (8 * (j / VT) + g) + 2 * (j % VT), h0 = 2 * q4, h1 = 2 * q4 + 1;
        constexpr float o = Types::OUT_SCALE;
        if (h0 < HEADS) { s_acc[warp][h0][d] = acc[j][0] * o; s_acc[warp][h0][d + 1] = acc[j][2] * o; }
        if (h1 < HEADS) { s_acc[warp][h1][d] = acc[j][1] * o; s_acc[warp][h1][d + 1] = acc[j][3] * o; }
    }
    __syncthreads();
    constexpr int VEC = 4;
    for (int idx = tid; idx < HEADS * HEAD_DIM / VEC; idx += THREADS) {
        const int h = idx / (HEAD_DIM / VEC), d = (idx % (HEAD_DIM / VEC)) * VEC;
        float m = neg_inf();
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, s_m[w][h]);
        float o[VEC] = {0.f, 0.f, 0.f, 0.f}, l = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float e = fast_exp2(s_m[w][h] - m);  // 0 for a warp that had no tokens
            l += e * s_l[w][h];
#pragma unroll
            for (int i = 0; i < VEC; ++i) o[i] += e * s_acc[w][h][d + i];
        }
        const long long orow = (long long)b * num_heads + head0 + h;
        if (single) {
            const float inv = 1.f / l;
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[orow * HEAD_DIM + d + i] = from_float<T>(o[i] * inv);
        } else {
            const long long prow = orow * max_splits + split;
            *reinterpret_cast<float4*>(part_out + prow * HEAD_DIM + d) = make_float4(o[0], o[1], o[2], o[3]);
            if (d == 0) part_ml[prow] = make_float2(m, l);
        }
    }
}

// Both kernels: CTA (x, y, z) takes partitions y, y + gridDim.y, ... of sequence z. The partition size comes from
// device memory and the grid need not cover every partition, so one captured CUDA graph serves every step: the
// host writes the step's partition before the replay (eager launches size the grid to cover them all).
template <typename Split>
__device__ __forceinline__ void for_each_partition(const int* __restrict__ partition_ptr,
                                                   const int* __restrict__ seq_lens, Split run_split) {
    const int partition = *partition_ptr, seq_len = seq_lens[blockIdx.z];
    for (int split = blockIdx.y; split * partition < seq_len; split += gridDim.y) {
        run_split(split, partition, seq_len);
        __syncthreads();  // the next partition reuses the shared memory
    }
}

template <typename T, typename C, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(THREADS, HEAD_DIM <= 128 ? 3 : 2)
paged_decode_tc(T* __restrict__ out, float* __restrict__ part_out, float2* __restrict__ part_ml,
                const T* __restrict__ q, long long q_stride, const C* __restrict__ k_cache,
                const C* __restrict__ v_cache, const unsigned char* __restrict__ k_scale,
                const unsigned char* __restrict__ v_scale, const int* __restrict__ block_tables, int max_blocks,
                const int* __restrict__ seq_lens, int num_kv_heads, int group, int head_chunks, int bs_log2,
                const int* __restrict__ partition_ptr, int max_splits, float scale_log2) {
    for_each_partition(partition_ptr, seq_lens, [&](int split, int partition, int seq_len) {
        decode_tc_split<T, C, HEAD_DIM, HEADS>(out, part_out, part_ml, q, q_stride, k_cache, v_cache, k_scale,
                                               v_scale, block_tables, max_blocks, seq_len, num_kv_heads, group,
                                               head_chunks, bs_log2, partition, max_splits, scale_log2, split);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// CUDA-core decode kernel (fp32, and shapes the tensor-core kernel does not take). A token's head_dim-wide K (or V)
// row is read by TPT threads, 16 bytes each; a CTA covers THREADS / TPT tokens at once, UNROLL times over before
// using the data. Three passes over the partition: scores q.k into shared memory, softmax statistics, then p.V.
// Dynamic shared memory: 4 * max(HEADS * partition, WARPS * HEADS * HEAD_DIM) bytes.
template <typename T, int HEAD_DIM, int HEADS>
__device__ __forceinline__ void
decode_simt_split(T* __restrict__ out, float* __restrict__ part_out, float2* __restrict__ part_ml,
                  const T* __restrict__ q, long long q_stride, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                  int seq_len, int num_kv_heads, int group, int head_chunks, int block_size,
                  int partition, int max_splits, float scale_log2, int split) {
    constexpr int N = Vec<T>::N, TPT = HEAD_DIM / N, TOKENS = THREADS / TPT;
    constexpr int UNROLL = HEADS * N <= 32 ? 8 : 4;  // loads in flight per thread, as registers allow
    static_assert(TPT <= 32 && 32 % TPT == 0, "a K row must be read by a power-of-two part of one warp");
    const int kvh = blockIdx.x / head_chunks, chunk = blockIdx.x % head_chunks;
    const int b = blockIdx.z, start = split * partition;
    const int head0 = kvh * group + chunk * HEADS, num_heads = num_kv_heads * group;
    const int end = min(start + partition, seq_len), n = end - start;
    const bool single = partition >= seq_len;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, tok_lane = tid % TPT, tok_group = tid / TPT;
    extern __shared__ float smem[];  // scores [HEADS][partition]; later partial sums [WARPS][HEADS][HEAD_DIM]
    __shared__ float s_max[HEADS], s_sum[HEADS];

    float qv[HEADS][N];
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
        load_vec(q + b * q_stride + (long long)(head0 + g) * HEAD_DIM + tok_lane * N, qv[g]);
#pragma unroll
        for (int i = 0; i < N; ++i) qv[g][i] *= scale_log2;  // scores in the log2 domain
    }
    const int* table = block_tables + (long long)b * max_blocks;
    const long long head_offset = (long long)kvh * block_size * HEAD_DIM + tok_lane * N;
    const long long block_stride = (long long)num_kv_heads * block_size * HEAD_DIM;

    // pass 1: scores. The loop bounds are the same for every lane (shuffles below need the whole warp).
    for (int base = start; base < end; base += TOKENS * UNROLL) {
        const int t0 = base + tok_group;
        float kv[UNROLL][N];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
                load_vec(k_cache + table[t / block_size] * block_stride + head_offset
                         + (long long)(t % block_size) * HEAD_DIM, kv[u]);
            } else {
#pragma unroll
                for (int i = 0; i < N; ++i) kv[u][i] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
#pragma unroll
            for (int g = 0; g < HEADS; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < N; ++i) dot += qv[g][i] * kv[u][i];
#pragma unroll
                for (int o = TPT / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (tok_lane == 0 && t < end) smem[g * partition + (t - start)] = dot;
            }
        }
    }
    __syncthreads();

    // pass 2: softmax statistics; scores become exp2(score - max)
    for (int g = warp; g < HEADS; g += WARPS) {
        float m = neg_inf();
        for (int i = lane; i < n; i += 32) m = fmaxf(m, smem[g * partition + i]);
        m = warp_max(m);
        float s = 0.f;
        for (int i = lane; i < n; i += 32) {
            const float e = fast_exp2(smem[g * partition + i] - m);
            smem[g * partition + i] = e;
            s += e;
        }
        s = warp_sum(s);
        if (lane == 0) { s_max[g] = m; s_sum[g] = s; }
    }
    __syncthreads();

    // pass 3: p.V
    float acc[HEADS][N];
#pragma unroll
    for (int g = 0; g < HEADS; ++g)
#pragma unroll
        for (int i = 0; i < N; ++i) acc[g][i] = 0.f;
    for (int base = start; base < end; base += TOKENS * UNROLL) {
        const int t0 = base + tok_group;
        float vv[UNROLL][N];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
                load_vec(v_cache + table[t / block_size] * block_stride + head_offset
                         + (long long)(t % block_size) * HEAD_DIM, vv[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS;
            if (t < end) {
#pragma unroll
                for (int g = 0; g < HEADS; ++g) {
                    const float p = smem[g * partition + (t - start)];
#pragma unroll
                    for (int i = 0; i < N; ++i) acc[g][i] += p * vv[u][i];
                }
            }
        }
    }
    // sum over the token groups of a warp (lanes that differ in the bits above TPT), then over warps
#pragma unroll
    for (int o = TPT; o < 32; o <<= 1)
#pragma unroll
        for (int g = 0; g < HEADS; ++g)
#pragma unroll
            for (int i = 0; i < N; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    __syncthreads();  // everyone is done with the scores: reuse the shared memory
    if (lane < TPT) {
#pragma unroll
        for (int g = 0; g < HEADS; ++g)
#pragma unroll
            for (int i = 0; i < N; ++i) smem[(warp * HEADS + g) * HEAD_DIM + tok_lane * N + i] = acc[g][i];
    }
    __syncthreads();
    for (int j = tid; j < HEADS * HEAD_DIM; j += THREADS) {
        const int g = j / HEAD_DIM, d = j % HEAD_DIM;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += smem[(w * HEADS + g) * HEAD_DIM + d];
        const long long orow = (long long)b * num_heads + head0 + g;
        if (single) {
            out[orow * HEAD_DIM + d] = from_float<T>(sum / s_sum[g]);
        } else {
            const long long prow = orow * max_splits + split;
            part_out[prow * HEAD_DIM + d] = sum;
            if (d == 0) part_ml[prow] = make_float2(s_max[g], s_sum[g]);
        }
    }
}

template <typename T, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(THREADS)
paged_decode_simt(T* __restrict__ out, float* __restrict__ part_out, float2* __restrict__ part_ml,
                  const T* __restrict__ q, long long q_stride, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                  const int* __restrict__ seq_lens, int num_kv_heads, int group, int head_chunks, int block_size,
                  const int* __restrict__ partition_ptr, int max_splits, float scale_log2) {
    for_each_partition(partition_ptr, seq_lens, [&](int split, int partition, int seq_len) {
        decode_simt_split<T, HEAD_DIM, HEADS>(out, part_out, part_ml, q, q_stride, k_cache, v_cache, block_tables,
                                              max_blocks, seq_len, num_kv_heads, group, head_chunks, block_size,
                                              partition, max_splits, scale_log2, split);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Combine the partitions of each (sequence, head): out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s.
// Grid (heads, sequences), THREADS threads: HEAD_DIM / 4 lanes per float4 of the row, the rest take every
// GROUPS-th partition; sequences with a single partition were written by the attention kernel.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(THREADS)
paged_decode_reduce(T* __restrict__ out, const float* __restrict__ part_out, const float2* __restrict__ part_ml,
                    const int* __restrict__ seq_lens, const int* __restrict__ partition_ptr, int max_splits) {
    constexpr int VECS = HEAD_DIM / 4, GROUPS = THREADS / VECS;
    static_assert(THREADS % VECS == 0 && GROUPS >= 1, "HEAD_DIM up to 512");
    const int h = blockIdx.x, b = blockIdx.y, num_heads = gridDim.x, tid = threadIdx.x, partition = *partition_ptr;
    const int splits = (seq_lens[b] + partition - 1) / partition;
    if (splits <= 1) return;
    const long long row = (long long)b * num_heads + h;
    const float2* ml = part_ml + row * max_splits;
    __shared__ float s_red[WARPS];
    __shared__ float s_o[GROUPS][HEAD_DIM];

    float m = neg_inf();
    for (int s = tid; s < splits; s += THREADS) m = fmaxf(m, ml[s].x);
    m = warp_max(m);
    if (tid % 32 == 0) s_red[tid / 32] = m;
    __syncthreads();
    m = s_red[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) m = fmaxf(m, s_red[w]);
    float l = 0.f;
    for (int s = tid; s < splits; s += THREADS) l += fast_exp2(ml[s].x - m) * ml[s].y;
    l = warp_sum(l);
    __syncthreads();  // everyone has read s_red
    if (tid % 32 == 0) s_red[tid / 32] = l;

    const int v = tid % VECS, grp = tid / VECS;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = grp; s < splits; s += GROUPS) {
        const float w = fast_exp2(ml[s].x - m);
        const float4 x = *reinterpret_cast<const float4*>(part_out + (row * max_splits + s) * HEAD_DIM + 4 * v);
        o.x += w * x.x; o.y += w * x.y; o.z += w * x.z; o.w += w * x.w;
    }
    s_o[grp][4 * v] = o.x; s_o[grp][4 * v + 1] = o.y; s_o[grp][4 * v + 2] = o.z; s_o[grp][4 * v + 3] = o.w;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += s_red[w];
    const float inv = 1.f / total;
    for (int d = tid; d < HEAD_DIM; d += THREADS) {
        float sum = 0.f;
#pragma unroll
        for (int gi = 0; gi < GROUPS; ++gi) sum += s_o[gi][d];
        out[row * HEAD_DIM + d] = from_float<T>(sum * inv);
    }
}

#ifdef CUPAGED_NVCC_CHECK
#define TCC(T, C, D, H) template __global__ void paged_decode_tc<T, C, D, H>(T*, float*, float2*, const T*, long long, const C*, const C*, const unsigned char*, const unsigned char*, const int*, int, const int*, int, int, int, int, const int*, int, float);
#define TC(T, D, H) TCC(T, T, D, H) TCC(T, e4m3, D, H)
#define SIMT(T, D, H) template __global__ void paged_decode_simt<T, D, H>(T*, float*, float2*, const T*, long long, const T*, const T*, const int*, int, const int*, int, int, int, int, const int*, int, float);
#define RED(T, D) template __global__ void paged_decode_reduce<T, D>(T*, const float*, const float2*, const int*, const int*, int);
TC(__nv_bfloat16, 128, 4) TC(__nv_bfloat16, 128, 8) TC(__half, 64, 1) TC(__half, 128, 2) TC(__nv_bfloat16, 256, 8)
SIMT(float, 128, 4) SIMT(float, 64, 8) SIMT(__half, 256, 2)
RED(__nv_bfloat16, 128) RED(float, 64) RED(__half, 256)
#endif

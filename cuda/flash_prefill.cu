// Flash prefill attention over the paged KV cache (FlashAttention-2 style, tensor cores through mma.sync).
//
// Semantics: layers/reference.py `paged_attention` for the sequences in the work list. Sequence b owns query rows
// query_start_loc[b]:query_start_loc[b+1]; its j-th query sits at position seq_len - query_len + j and attends to
// every key at a position <= its own. All K/V (the cached prefix and the new tokens) come from the paged cache,
// one layer's k_cache/v_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM] (HND), through block_tables.
//
// Work decomposition. One CTA = one (query tile of BLOCK_M rows of one sequence, one query head). Query tiles
// never cross sequences: the host builds `work` = (sequence, first row of the tile) pairs, longest K ranges first,
// and the grid is 1-D with the head fastest, so the heads of a GQA group (which read the same K/V tiles) run side
// by side and the longest tiles start first.
//
// Inside a CTA: WARPS warps, each owning WARP_M = 16 * MT query rows (MT m16 tiles): BLOCK_M = WARPS * WARP_M.
// K/V are walked in tiles of BLOCK_N keys, double-buffered in shared memory: cp.async (16-byte, zero-fill past
// seq_len) gathers tile t+1 through the block table while tile t is computed, one barrier per tile; the
// block-table entries of tile t+2 travel by 4-byte cp.async into shared memory meanwhile, so the gather never
// waits on a global load. Per tile and warp:
//   S = Q K^T         mma.m16n8k16 (A = Q from registers when MT == 1, else ldmatrix from shared memory;
//                     B = K via ldmatrix), fp32 accumulators, never written to memory
//   causal mask       only on tiles that reach past the position of the warp's first row
//   online softmax    running max in the log2 domain: p = exp2(s * scale * log2(e) - m); row sums kept per
//                     thread and reduced over the quad once at the end
//   O += P V          P re-packed from the S accumulators into A fragments in registers; V via ldmatrix.trans
// Warps whose rows are all masked for a tile (or past query_len) skip its math but keep the barriers.
// Shared memory rows are HEAD_DIM elements; 16-byte chunks are XOR-swizzled with (row % 8), which makes both the
// cp.async stores and every ldmatrix phase conflict-free.
//
// Configurations (layers/flash_prefill.py picks one; ptxas -v for sm_90 with nvcc 13.0, per dtype):
//   <D=128, 4 warps, MT 2, N 64>  BLOCK_M 128, 96.5 KiB smem, 255 regs + 56 B spill (L1-resident reloads of loop
//                                 invariants, ~11 LDL per tile), 2 CTAs/SM: FlashAttention-2's shape (default)
//   <D=128, 4, 2, 32>             BLOCK_M 128, 64.3 KiB, 255 regs, no spill, 2 CTAs/SM
//   <D=128, 8, 1, 64>             BLOCK_M 128, 96.5 KiB, 216 regs, 1 CTA/SM (Q fragments stay in registers)
//   <D=128, 4, 1, 64>             BLOCK_M 64, 80.5 KiB, 178 regs, 2 CTAs/SM (twice the K/V traffic per row)
//   <D=64, 4, 2, 64>              BLOCK_M 128, 48.5 KiB, 228 regs, no spill (default)
#include "common.cuh"

namespace flash {
using cupaged::Mma;
using cupaged::fast_exp2;
using cupaged::neg_inf;


__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
// 4 bytes global -> shared (through L1).
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}


// Byte offset of element (row, 8 * chunk) in a [rows][HEAD_DIM] tile with 16-byte chunks swizzled by row % 8.
template <int HEAD_DIM, typename T>
__device__ __forceinline__ unsigned swz(int row, int chunk) {
    return static_cast<unsigned>((row * HEAD_DIM + ((chunk ^ (row & 7)) << 3)) * sizeof(T));
}

// FP8 cache: 8 e4m3 codes times their row's scale -> 16 bytes of T in shared memory (the tiles stay T, so the
// math below is unchanged). Exact for bf16 (3-bit mantissas times a power of two); fp16 rounds only values
// below its normal range.
template <typename T>
__device__ __forceinline__ void st_dequant8(unsigned dst, uint2 codes, float scale) {
    const uint4 h = cupaged::e4m3x8_to_half8(codes);
    const unsigned w[4] = {h.x, h.y, h.z, h.w};
    unsigned r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        r[i] = Mma<T>::pack(f.x * scale, f.y * scale);
    }
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
}

template <typename T, typename C> struct IsFp8 { static constexpr bool value = false; };
template <typename T> struct IsFp8<T, cupaged::e4m3> { static constexpr bool value = true; };

}  // namespace flash

// out/q rows are [*, num_heads, HEAD_DIM] with heads and elements contiguous and row strides o_stride/q_stride
// (elements, multiples of 8). work: int2 (sequence, first query row of the tile) per query tile; the grid is
// num_items * num_heads CTAs of WARPS * 32 threads with smem_bytes(...) of dynamic shared memory.
// C: the cache's element type, T or e4m3 (codes, with per-row scale exponents k_scale / v_scale [blocks, Hkv, bs]:
// the gather dequantizes them into the T tiles, through registers instead of cp.async).
template <typename T, typename C, int HEAD_DIM, int WARPS, int MT, int BLOCK_N>
__global__ void __launch_bounds__(WARPS * 32)
flash_prefill(T* __restrict__ out, long long o_stride, const T* __restrict__ q, long long q_stride,
              const C* __restrict__ k_cache, const C* __restrict__ v_cache, const unsigned char* __restrict__ k_scale,
              const unsigned char* __restrict__ v_scale, const int* __restrict__ block_tables,
              int max_blocks, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
              const int2* __restrict__ work, int num_heads, int num_kv_heads, int block_size_log2,
              float scale_log2) {
    using namespace flash;
    constexpr int THREADS = WARPS * 32, WARP_M = 16 * MT, BLOCK_M = WARPS * WARP_M;
    constexpr int CHUNKS = HEAD_DIM / 8;              // 16-byte chunks per row
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;   // rows one pass of the CTA's 16-byte copies covers
    constexpr int KV_PASSES = BLOCK_N / ROWS_PER_PASS, Q_PASSES = BLOCK_M / ROWS_PER_PASS;
    constexpr int NT = BLOCK_N / 8;                   // n8 tiles of S
    constexpr int DT = HEAD_DIM / 8;                  // n8 tiles of O
    constexpr int KS = HEAD_DIM / 16;                 // k16 steps of Q K^T
    static_assert(HEAD_DIM % 64 == 0, "HEAD_DIM must be a multiple of 64 (swizzle over 8 chunks)");
    static_assert(THREADS % CHUNKS == 0 && BLOCK_N % ROWS_PER_PASS == 0 && BLOCK_M % ROWS_PER_PASS == 0
                      && ROWS_PER_PASS % 8 == 0 && BLOCK_N <= THREADS && BLOCK_N % 16 == 0,
                  "copy layout");
    constexpr int Q_ELEMS = BLOCK_M * HEAD_DIM, KV_ELEMS = BLOCK_N * HEAD_DIM;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* s_q = reinterpret_cast<T*>(smem_raw);  // [BLOCK_M][HEAD_DIM]
    T* s_k = s_q + Q_ELEMS;                   // [2][BLOCK_N][HEAD_DIM]
    T* s_v = s_k + 2 * KV_ELEMS;              // [2][BLOCK_N][HEAD_DIM]
    int* s_tbl = reinterpret_cast<int*>(s_v + 2 * KV_ELEMS);  // [2][BLOCK_N] physical blocks of a tile
    const unsigned sq_base = smem_addr(s_q), sk_base = smem_addr(s_k), sv_base = smem_addr(s_v);
    const unsigned stl_base = smem_addr(s_tbl);

    const int head = blockIdx.x % num_heads;
    const int2 item = work[blockIdx.x / num_heads];
    const int b = item.x, i0 = item.y;  // sequence, first query row (within the sequence) of this tile
    const int q_begin = query_start_loc[b];
    const int q_len = query_start_loc[b + 1] - q_begin;
    const int seq_len = seq_lens[b];
    const int ctx0 = seq_len - q_len;  // position of query row 0
    const int kvh = head / (num_heads / num_kv_heads);
    const int rows_valid = min(BLOCK_M, q_len - i0);
    const int n_tiles = (ctx0 + i0 + rows_valid - 1) / BLOCK_N + 1;  // tiles up to the last row's position

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int chunk = tid % CHUNKS, row0 = tid / CHUNKS;

    // ---- K/V tile gather through the block table ----
    // The block-table entries of a tile are staged in shared memory (s_tbl[tile & 1]) by 4-byte cp.asyncs issued
    // one tile ahead, so the gather of tile t+1 reads them from shared memory instead of waiting on global loads.
    const int* table = block_tables + (long long)b * max_blocks;
    const int block_mask = (1 << block_size_log2) - 1;
    const int tbl_entries = BLOCK_N >> block_size_log2 > 0 ? BLOCK_N >> block_size_log2 : 1;  // blocks per tile
    const long long block_stride = (long long)num_kv_heads * HEAD_DIM << block_size_log2;
    const int head_off = (kvh * HEAD_DIM << block_size_log2) + chunk * 8;  // < block_stride
    // rows row0 + p * ROWS_PER_PASS share row0's swizzle (ROWS_PER_PASS % 8 == 0): one base, immediates after
    const unsigned kv_dst = swz<HEAD_DIM, T>(row0, chunk);
    auto stage_table = [&](int tile, int stage) {  // entries of `tile` -> s_tbl[stage]
        const int blk = ((tile * BLOCK_N) >> block_size_log2) + tid;
        if (tid < tbl_entries && (blk << block_size_log2) < seq_len)
            cp_async4(stl_base + (stage * BLOCK_N + tid) * 4, table + blk);
    };
    auto issue = [&](int tile, int stage) {  // K/V rows of `tile` -> stage (zeros past seq_len)
        const int first_blk = (tile * BLOCK_N) >> block_size_log2;
#pragma unroll
        for (int p = 0; p < KV_PASSES; ++p) {
            const int r = row0 + p * ROWS_PER_PASS, key = tile * BLOCK_N + r;
            const bool valid = key < seq_len;
            const unsigned dst = kv_dst + (stage * KV_ELEMS + p * ROWS_PER_PASS * HEAD_DIM) * (int)sizeof(T);
            long long off = 0;
            const int blk = valid ? s_tbl[stage * BLOCK_N + (key >> block_size_log2) - first_blk] : 0;
            if (valid) off = (long long)blk * block_stride + (head_off + (key & block_mask) * HEAD_DIM);
            if constexpr (IsFp8<T, C>::value) {
                uint2 kc = make_uint2(0, 0), vc = make_uint2(0, 0);
                float ks = 0.f, vs = 0.f;
                if (valid) {
                    const long long srow = (((long long)blk * num_kv_heads + kvh) << block_size_log2)
                                           + (key & block_mask);
                    kc = *reinterpret_cast<const uint2*>(k_cache + off);
                    vc = *reinterpret_cast<const uint2*>(v_cache + off);
                    ks = cupaged::exponent_scale(k_scale[srow]);
                    vs = cupaged::exponent_scale(v_scale[srow]);
                }
                st_dequant8<T>(sk_base + dst, kc, ks);
                st_dequant8<T>(sv_base + dst, vc, vs);
            } else {
                cp_async16(sk_base + dst, k_cache + off, valid);
                cp_async16(sv_base + dst, v_cache + off, valid);
            }
        }
    };
    stage_table(0, 0);
    if (n_tiles > 1) stage_table(1, 1);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    // ---- Q tile -> shared (rows past query_len are zero) ----
    {
        const T* src = q + (long long)(q_begin + i0) * q_stride + (long long)head * HEAD_DIM + chunk * 8;
#pragma unroll
        for (int p = 0; p < Q_PASSES; ++p) {
            const int r = row0 + p * ROWS_PER_PASS;
            const bool valid = r < rows_valid;
            cp_async16(sq_base + kv_dst + p * ROWS_PER_PASS * HEAD_DIM * (int)sizeof(T),
                       valid ? src + r * q_stride : q, valid);
        }
    }
    issue(0, 0);  // with the Q tile: the first group
    cp_async_commit();

    // ---- this warp's rows ----
    const int warp_row0 = i0 + warp * WARP_M;  // within the sequence
    const int warp_rows = min(WARP_M, q_len - warp_row0);
    const int warp_first_pos = ctx0 + warp_row0, warp_last_pos = warp_first_pos + warp_rows - 1;
    const bool warp_active = warp_rows > 0;

    float o[MT][DT][4];
    float m[MT][2], l[MT][2];  // running max (log2 domain) and this thread's partial row sums; [h]: row +8h
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][d][e] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m[mt][h] = neg_inf();  // -inf
            l[mt][h] = 0.f;
        }
    }
    unsigned qf[MT == 1 ? KS : 1][4];  // Q A-fragments, kept in registers when the warp has one m16 tile

    // Per-lane ldmatrix byte offsets. Every ldmatrix row is a multiple of 8 plus lane % 8, so its swizzle key is
    // lane & 7, and chunk 2 * i + c (i = 0..3, c = 0/1 by lane) XOR that key stays below 8: the offset of chunk
    // 2 * k + c is off[k & 3] + (k >> 2) * 128 bytes. Four registers per operand; the rest folds into immediates.
    constexpr int ROW_BYTES = HEAD_DIM * (int)sizeof(T);
    unsigned q_off[4], k_off[4], v_off[4];
    {
        const int key = lane & 7;
        const int a_row = warp * WARP_M + (lane & 15), a_chunk = lane >> 4;            // Q as A (row-major)
        const int k_row = (lane & 7) + ((lane >> 4) << 3), k_chunk = (lane >> 3) & 1;  // K as B (col-major)
        const int v_row = lane & 15, v_chunk = lane >> 4;                              // V as B, transposed
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            q_off[i] = sq_base + a_row * ROW_BYTES + (((2 * i + a_chunk) ^ key) << 4);
            k_off[i] = k_row * ROW_BYTES + (((2 * i + k_chunk) ^ key) << 4);
            v_off[i] = v_row * ROW_BYTES + (((2 * i + v_chunk) ^ key) << 4);
        }
    }
    const int g_row = lane >> 2, t_col = (lane & 3) * 2;  // accumulator element (row g_row (+8), col t_col (+1))

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile & 1;
        cp_async_wait_all();
        __syncthreads();  // tile `tile` has landed for all threads; all are done with the other stage
        if (tile + 1 < n_tiles) {
            issue(tile + 1, stage ^ 1);
            if (tile + 2 < n_tiles) stage_table(tile + 2, stage);  // tile's own entries are used up
            cp_async_commit();
        }
        if constexpr (MT == 1) {
            if (tile == 0) {
#pragma unroll
                for (int ks = 0; ks < KS; ++ks)
                    ldmatrix_x4(qf[ks], q_off[ks & 3] + (ks >> 2) * 128);
            }
        }
        const int key0 = tile * BLOCK_N;
        if (!warp_active || key0 > warp_last_pos) continue;  // every key of this tile is masked for the warp

        const unsigned k_tile = sk_base + stage * KV_ELEMS * (int)sizeof(T);
        const unsigned v_tile = sv_base + stage * KV_ELEMS * (int)sizeof(T);

        // S = Q K^T
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (MT == 1) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[mt][e] = qf[ks][e];
                } else {
                    ldmatrix_x4(a[mt], q_off[ks & 3] + (ks >> 2) * 128 + mt * 16 * ROW_BYTES);
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned kb[4];
                ldmatrix_x4(kb, k_tile + k_off[ks & 3] + (ks >> 2) * 128 + np * 16 * ROW_BYTES);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(s[mt][2 * np], a[mt], kb[0], kb[1]);
                    Mma<T>::mma(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
                }
            }
        }

        // causal mask, only where some key of the tile lies past the warp's first row's position:
        // key0 + j*8 + t_col + (e&1) > warp_first_pos + mt*16 + g_row + (e>>1)*8  <=>  constant > diag
        if (key0 + BLOCK_N - 1 > warp_first_pos) {
            const int diag = warp_first_pos + g_row - key0 - t_col;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (j * 8 + (e & 1) - mt * 16 - (e >> 1) * 8 > diag)
                            s[mt][j][e] = neg_inf();
        }

        // online softmax (log2 domain)
        float alpha[MT][2];
        bool rescale = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = neg_inf();
#pragma unroll
                for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][h], mx * scale_log2);
                // a row with no visible key so far keeps m = -inf; subtract 0 then (all its p are 0)
                const float m_use = m_new == neg_inf() ? 0.f : m_new;
                alpha[mt][h] = fast_exp2(m[mt][h] - m_use);
                rescale |= m_new != m[mt][h];
                m[mt][h] = m_new;
                l[mt][h] *= alpha[mt][h];
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const float p0 = fast_exp2(fmaf(s[mt][j][2 * h], scale_log2, -m_use));
                    const float p1 = fast_exp2(fmaf(s[mt][j][2 * h + 1], scale_log2, -m_use));
                    s[mt][j][2 * h] = p0;
                    s[mt][j][2 * h + 1] = p1;
                    sum += p0 + p1;
                }
                l[mt][h] += sum;
            }
        }
        // With one m tile per warp (registers to spare), rescale O only when some row's max moved (alpha is
        // exactly 1 otherwise: most late tiles). With two, the test and its state cost more spills than it saves.
        if (MT == 2 || __any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int d = 0; d < DT; ++d)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[mt][d][e] *= alpha[mt][e >> 1];
        }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned vb[4];
                ldmatrix_x4_trans(vb, v_tile + v_off[dp & 3] + (dp >> 2) * 128 + kk * 16 * ROW_BYTES);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::mma(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                    Mma<T>::mma(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    cp_async_wait_all();  // nothing should be in flight here; keep the exit clean regardless

    // ---- epilogue: O / l -> out ----
    if (!warp_active) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[mt][h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = 1.f / sum;
            const int r = warp_row0 + mt * 16 + g_row + h * 8;  // within the sequence
            if (r < q_len) {
                T* dst = out + (long long)(q_begin + r) * o_stride + (long long)head * HEAD_DIM + t_col;
#pragma unroll
                for (int d = 0; d < DT; ++d)
                    *reinterpret_cast<unsigned*>(dst + d * 8) =
                        Mma<T>::pack(o[mt][d][2 * h] * inv, o[mt][d][2 * h + 1] * inv);
            }
        }
    }
}

#ifdef CUPAGED_NVCC_CHECK
#define CUPAGED_FLASH_INST(T, C, D, W, MT, N)                                                                    \
    template __global__ void flash_prefill<T, C, D, W, MT, N>(T*, long long, const T*, long long, const C*,     \
                                                              const C*, const unsigned char*,                   \
                                                              const unsigned char*, const int*, int, const int*, \
                                                              const int*, const int2*, int, int, int, float);
#define CUPAGED_FLASH_INST_T(D, W, MT, N)                                                                        \
    CUPAGED_FLASH_INST(__nv_bfloat16, __nv_bfloat16, D, W, MT, N) CUPAGED_FLASH_INST(__half, __half, D, W, MT, N) \
    CUPAGED_FLASH_INST(__nv_bfloat16, cupaged::e4m3, D, W, MT, N) CUPAGED_FLASH_INST(__half, cupaged::e4m3, D, W, MT, N)
CUPAGED_FLASH_INST_T(128, 4, 2, 64)
CUPAGED_FLASH_INST_T(128, 4, 2, 32)
CUPAGED_FLASH_INST_T(128, 8, 1, 64)
CUPAGED_FLASH_INST_T(128, 4, 1, 64)
CUPAGED_FLASH_INST_T(64, 4, 2, 64)
CUPAGED_FLASH_INST_T(64, 8, 1, 64)
#undef CUPAGED_FLASH_INST_T
#undef CUPAGED_FLASH_INST
#endif

// Flash prefill attention over the paged KV cache for Hopper (sm_90a): warpgroup MMA (wgmma) from shared memory.
//
// Semantics: those of flash_prefill.cu (layers/reference.py `paged_attention` for the sequences in the work list,
// causal, K/V of the cached prefix and of the new tokens alike read from the paged cache [num_blocks, Hkv,
// block_size, HEAD_DIM] through block_tables), for HEAD_DIM 128 and a T (fp16/bf16) cache; the same work list
// and grid (one CTA per (query tile of 128 rows of one sequence, query head), heads fastest).
//
// A CTA is two warpgroups (256 threads); warpgroup w owns query rows 64w..64w+63 of the tile. K/V are walked in
// tiles of 128 keys, STAGES deep in shared memory: every thread gathers its share of tile t+STAGES-1 through the
// block table with 16-byte cp.async (zeros past seq_len) while tile t is computed; the block ids of the tile after
// are loaded into registers meanwhile, so the gather never waits on a global load. One barrier per tile. Per tile
// and warpgroup:
//   S = Q K^T       8 x wgmma m64n128k16, A = Q and B = K both from shared memory (K-major), fp32 in registers
//   causal mask     only on tiles that reach past the warpgroup's first row's position
//   online softmax  as in flash_prefill.cu (log2 domain, row sums per thread reduced over the quad at the end)
//   O += P V        8 x wgmma m64n128k16 with A = P from registers (the S accumulator layout of a warp is the
//                   A-fragment layout of its 16 rows, as with mma.sync) and B = V from shared memory (MN-major)
// The two warpgroups issue their MMAs independently, so one's softmax overlaps the other's MMAs. OVERLAP (three
// stages instead of two) also issues S of tile t+1 before the softmax of tile t, so that a warpgroup's own softmax
// overlaps its next QK^T (FlashAttention-3's intra-warpgroup pipelining), at the cost of 64 more live registers
// (255 and ~100 bytes of spills with nvcc 13.0, against 217 and none without).
//
// Shared memory: every tile (Q 128 x 128, K and V 128 x 128 per stage) is stored as two 64-column panels of
// 128-byte rows, the 16-byte chunk c of row r at chunk c ^ (r % 8): the 128-byte swizzle wgmma reads (each
// 8-row group, 1024 bytes, is one swizzle atom; panels start on 1024-byte boundaries). Descriptors:
//   Q, K (K-major)  start + k16 step * 32 bytes inside a panel, stride byte offset 1024 (next 8 rows)
//   V (MN-major)    start + 16 keys * 128 bytes, leading byte offset = panel size (next 64 columns of d),
//                   stride byte offset 1024 (next 8 keys)
// cp.async writes through the generic proxy and wgmma reads through the async proxy: each thread fences
// (fence.proxy.async) after its copies land and before the barrier that publishes a tile.
//
// Needs sm_90a (wgmma): layers/flash_prefill.py compiles it with -arch=sm_90a and picks it on compute
// capability 9.0 only. (1 + 2 * STAGES) * 32 KiB + 1 KiB of shared memory (161 or 225 KiB), one CTA per SM.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_prefill_sm90.cu needs -arch=sm_90a (wgmma)"
#endif

namespace sm90 {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;  // 0: write zeros, read nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Make this thread's generic-proxy shared-memory writes visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of accumulator registers across the asynchronous MMAs' issue and wait.
__device__ __forceinline__ void fence_operands(float* d) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (PTX ISA "matrix descriptor format").
__device__ __forceinline__ unsigned long long descriptor(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return (unsigned long long)((addr & 0x3ffffu) >> 4) | (unsigned long long)((lead_bytes & 0x3ffffu) >> 4) << 16
           | (unsigned long long)((stride_bytes & 0x3ffffu) >> 4) << 32 | 1ull << 62;
}

// d[64] (a warp's 16 rows x 128 columns of the warpgroup's 64 x 128 fp32 tile; d[4j + e] at row lane/4 + 8(e/2),
// column 8j + 2(lane%4) + e%2) += A B, one k16 step. ss: A (64 x 16) and B (128 x 16) from shared memory, both
// K-major. rs: A from registers (4 x 2 elements), B (16 x 128) from shared memory, MN-major.
template <typename T> struct Wgmma;
// The 64 accumulators as asm operands %0..%63, and their list in the instruction.
#define CUPAGED_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                      "+f"(d[i + 6]), "+f"(d[i + 7])
#define CUPAGED_D64 CUPAGED_D8(0), CUPAGED_D8(8), CUPAGED_D8(16), CUPAGED_D8(24), CUPAGED_D8(32), CUPAGED_D8(40), \
                    CUPAGED_D8(48), CUPAGED_D8(56)
#define CUPAGED_D_LIST                                                                                        \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
    "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// scale-d is a predicate (1: accumulate), set from an "r" operand; trans-b = 1 reads B MN-major.
#define CUPAGED_WGMMA(T_, TY)                                                                                  \
    template <> struct Wgmma<T_> {                                                                             \
        static __device__ __forceinline__ void ss(float* d, unsigned long long a, unsigned long long b) {      \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                          \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " CUPAGED_D_LIST          \
                         ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                      \
                         : CUPAGED_D64                                                                         \
                         : "l"(a), "l"(b), "r"(1));                                                            \
        }                                                                                                      \
        static __device__ __forceinline__ void rs(float* d, const unsigned* a, unsigned long long b) {         \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                          \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " CUPAGED_D_LIST          \
                         ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                        \
                         : CUPAGED_D64                                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                        \
        }                                                                                                      \
    };
CUPAGED_WGMMA(__nv_bfloat16, "bf16")
CUPAGED_WGMMA(__half, "f16")
#undef CUPAGED_WGMMA
#undef CUPAGED_D_LIST
#undef CUPAGED_D64
#undef CUPAGED_D8

}  // namespace sm90

// Arguments: those of flash_prefill<T, T, 128, ...> without the FP8 scales. Grid: num_items * num_heads CTAs of
// 256 threads with layers/flash_prefill.py's smem_bytes_sm90 of dynamic shared memory.
template <typename T, int HEAD_DIM, bool OVERLAP>
__global__ void __launch_bounds__(256, 1)
flash_prefill_sm90(T* __restrict__ out, long long o_stride, const T* __restrict__ q, long long q_stride,
                   const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                   int max_blocks, const int* __restrict__ query_start_loc, const int* __restrict__ seq_lens,
                   const int2* __restrict__ work, int num_heads, int num_kv_heads, int block_size_log2,
                   float scale_log2) {
    using namespace sm90;
    static_assert(HEAD_DIM == 128, "one 128 x 128 tile shape");
    constexpr int BLOCK_M = 128, BLOCK_N = 128, THREADS = 256;
    constexpr int STAGES = OVERLAP ? 3 : 2, AHEAD = STAGES - 1;  // K/V tiles in flight ahead of the current one
    constexpr int CHUNKS = HEAD_DIM / 8;             // 16-byte chunks per row
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // 16
    constexpr int PASSES = BLOCK_N / ROWS_PER_PASS;  // 8 (BLOCK_M == BLOCK_N)
    constexpr unsigned PANEL = BLOCK_N * 128;        // bytes of one 64-column panel of a 128-row tile
    constexpr unsigned TILE = 2 * PANEL;             // bytes of a 128 x 128 tile
    constexpr int NJ = BLOCK_N / 8;                  // n8 column groups of S and of O (BLOCK_N == HEAD_DIM)

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
    const unsigned sq = base, sk = base + TILE, sv = base + (1 + STAGES) * TILE;  // Q; K[STAGES]; V[STAGES]

    const int head = blockIdx.x % num_heads;
    const int2 item = work[blockIdx.x / num_heads];
    const int b = item.x, i0 = item.y;
    const int q_begin = query_start_loc[b];
    const int q_len = query_start_loc[b + 1] - q_begin;
    const int seq_len = seq_lens[b];
    const int ctx0 = seq_len - q_len;
    const int kvh = head / (num_heads / num_kv_heads);
    const int rows_valid = min(BLOCK_M, q_len - i0);
    const int n_tiles = (ctx0 + i0 + rows_valid - 1) / BLOCK_N + 1;

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
    const int chunk = tid % CHUNKS, row0 = tid / CHUNKS;
    // rows row0 + p * 16 share row0's swizzle: one offset, plus p * 2048 bytes
    const unsigned copy_off = (chunk >> 3) * PANEL + row0 * 128 + (((chunk & 7) ^ (row0 & 7)) << 4);

    // ---- K/V gather through the block table ----
    const int* table = block_tables + (long long)b * max_blocks;
    const int block_mask = (1 << block_size_log2) - 1;
    const long long block_stride = (long long)num_kv_heads * HEAD_DIM << block_size_log2;
    const int head_off = (kvh * HEAD_DIM << block_size_log2) + chunk * 8;
    int blk[PASSES];  // physical blocks of this thread's rows of the next tile to gather
    auto load_blocks = [&](int tile) {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int key = tile * BLOCK_N + row0 + p * ROWS_PER_PASS;
            blk[p] = key < seq_len ? table[key >> block_size_log2] : 0;
        }
    };
    auto issue = [&](int tile) {  // one commit group: tile's K and V rows (zeros past seq_len) -> its stage
        const unsigned stage_off = (tile % STAGES) * TILE + copy_off;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int key = tile * BLOCK_N + row0 + p * ROWS_PER_PASS;
            const bool valid = key < seq_len;
            const long long off = valid ? (long long)blk[p] * block_stride + (head_off + (key & block_mask) * HEAD_DIM)
                                        : 0;
            const unsigned dst = stage_off + p * ROWS_PER_PASS * 128;
            cp_async16(sk + dst, k_cache + off, valid);
            cp_async16(sv + dst, v_cache + off, valid);
        }
        cp_async_commit();
    };
    {  // Q tile (rows past query_len are zero), in tile 0's group
        const T* src = q + (long long)(q_begin + i0) * q_stride + (long long)head * HEAD_DIM + chunk * 8;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = row0 + p * ROWS_PER_PASS;
            cp_async16(sq + copy_off + p * ROWS_PER_PASS * 128, r < rows_valid ? src + r * q_stride : q,
                       r < rows_valid);
        }
    }
    for (int t = 0; t < AHEAD && t < n_tiles; ++t) {
        load_blocks(t);
        issue(t);
    }
    if (AHEAD < n_tiles) load_blocks(AHEAD);

    // ---- this warpgroup's rows: it computes tiles 0..wg_tiles-1 (later ones are masked for all its rows) ----
    const int wg_row0 = i0 + wg * 64;  // within the sequence
    const int wg_rows = min(64, q_len - wg_row0);
    const int wg_first_pos = ctx0 + wg_row0;
    const int wg_tiles = wg_rows > 0 ? (wg_first_pos + wg_rows - 1) / BLOCK_N + 1 : 0;
    const int g_row = lane >> 2, t_col = (lane & 3) * 2;
    const int row_pos = wg_first_pos + (warp & 3) * 16 + g_row;  // position of this thread's row (h = 0)
    const unsigned q_rows = sq + wg * 64 * 128;  // this warpgroup's 64 rows in each Q panel (8 KiB aligned)

    float o[4 * NJ], m[2], l[2];
#pragma unroll
    for (int i = 0; i < 4 * NJ; ++i) o[i] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        m[h] = cupaged::neg_inf();
        l[h] = 0.f;
    }

    // S = Q K^T of `tile` into s, issued (one wgmma group), not waited: 8 k16 steps, 4 per panel, 32 bytes apart
    auto qk = [&](int tile, float (&s)[4 * NJ]) {
        const unsigned k_tile = sk + (tile % STAGES) * TILE;
#pragma unroll
        for (int i = 0; i < 4 * NJ; ++i) s[i] = 0.f;
        fence_operands(s);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
            const unsigned koff = (ks >> 2) * PANEL + (ks & 3) * 32;
            Wgmma<T>::ss(s, descriptor(q_rows + koff, 16, 1024), descriptor(k_tile + koff, 16, 1024));
        }
        wgmma_commit();
    };
    // Mask, online softmax, O rescale of `tile`'s S, then O += P V issued (one wgmma group), not waited
    auto softmax_pv = [&](int tile, float (&s)[4 * NJ]) {
        const int key0 = tile * BLOCK_N;
        // causal mask where some key of the tile lies past the warpgroup's first row's position:
        // key0 + 8j + t_col + (e & 1) > row_pos + 8 (e >> 1)
        if (key0 + BLOCK_N - 1 > wg_first_pos) {
            const int diag = row_pos - key0 - t_col;
#pragma unroll
            for (int j = 0; j < NJ; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (8 * j + (e & 1) - 8 * (e >> 1) > diag) s[4 * j + e] = cupaged::neg_inf();
        }
        // online softmax (log2 domain)
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = cupaged::neg_inf();
#pragma unroll
            for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[h], mx * scale_log2);
            const float m_use = m_new == cupaged::neg_inf() ? 0.f : m_new;  // a row with nothing visible yet
            alpha[h] = cupaged::fast_exp2(m[h] - m_use);
            m[h] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = cupaged::fast_exp2(fmaf(s[4 * j + 2 * h + c], scale_log2, -m_use));
                    s[4 * j + 2 * h + c] = p;
                    sum += p;
                }
            }
            l[h] = l[h] * alpha[h] + sum;
        }
#pragma unroll
        for (int i = 0; i < 4 * NJ; ++i) o[i] *= alpha[(i >> 1) & 1];
        // O += P V over 8 k16 steps of keys (16 keys = 2048 bytes of a V panel)
        unsigned pa[BLOCK_N / 16][4];
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            pa[kk][0] = cupaged::Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
            pa[kk][1] = cupaged::Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = cupaged::Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = cupaged::Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
        const unsigned v_tile = sv + (tile % STAGES) * TILE;
        fence_operands(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            Wgmma<T>::rs(o, pa[kk], descriptor(v_tile + kk * 16 * 128, PANEL, 1024));
        wgmma_commit();
    };

    float s[4 * NJ];
    for (int tile = 0; tile < n_tiles; ++tile) {
        // Tiles up to tile + AHEAD - 1 have landed for all, and every warpgroup has waited for its MMAs of tile - 1:
        // the stage of tile - 1 is free for tile + AHEAD.
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        if (tile + AHEAD < n_tiles) {
            issue(tile + AHEAD);
            if (tile + AHEAD + 1 < n_tiles) load_blocks(tile + AHEAD + 1);
        }
        if constexpr (!OVERLAP) {
            if (tile < wg_tiles) {
                qk(tile, s);
                wgmma_wait_all();
                fence_operands(s);
                softmax_pv(tile, s);
                wgmma_wait_all();
                fence_operands(o);
            }
        } else {  // S of tile + 1 runs on the tensor cores during the softmax of tile
            if (tile == 0 && wg_tiles > 0) {
                qk(0, s);
                wgmma_wait_all();
                fence_operands(s);
            }
            float s_next[4 * NJ];
            if (tile + 1 < wg_tiles) qk(tile + 1, s_next);
            if (tile < wg_tiles) softmax_pv(tile, s);
            wgmma_wait_all();
            fence_operands(o);
            fence_operands(s_next);
#pragma unroll
            for (int i = 0; i < 4 * NJ; ++i) s[i] = s_next[i];
        }
    }
    cp_async_wait_all();

    // ---- epilogue: O / l -> out ----
    if (wg_tiles == 0) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = l[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = 1.f / sum;
        const int r = wg_row0 + (warp & 3) * 16 + g_row + 8 * h;  // within the sequence
        if (r < q_len) {
            T* dst = out + (long long)(q_begin + r) * o_stride + (long long)head * HEAD_DIM + t_col;
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                *reinterpret_cast<unsigned*>(dst + 8 * j) =
                    cupaged::Mma<T>::pack(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        }
    }
}

#ifdef CUPAGED_NVCC_CHECK
#define CUPAGED_FLASH_SM90_INST(T, OVERLAP)                                                                        \
    template __global__ void flash_prefill_sm90<T, 128, OVERLAP>(T*, long long, const T*, long long, const T*,    \
                                                                 const T*, const int*, int, const int*,           \
                                                                 const int*, const int2*, int, int, int, float);
CUPAGED_FLASH_SM90_INST(__nv_bfloat16, false)
CUPAGED_FLASH_SM90_INST(__half, false)
CUPAGED_FLASH_SM90_INST(__nv_bfloat16, true)
CUPAGED_FLASH_SM90_INST(__half, true)
#undef CUPAGED_FLASH_SM90_INST
#endif

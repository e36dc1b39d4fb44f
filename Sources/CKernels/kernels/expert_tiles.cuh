// The expert tasks' tiles: GEMM0 and GEMM1 of a 128 × 256 tile (gemm0_task, gemm1_task), of a 64 × 256 half tile
// for a partial row block, and GEMM1 tiles chained within a row block (chain_tiles), each with its epilogue (the
// staged ones here, the ones from the accumulators in register_epilogues.cuh); the decode tiles and the GEMV are
// decode_tiles.cuh. The scheduler that hands them out is phase_experts.cuh. See moe.cu (phase 3).
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_fp8.cuh"
#include "register_epilogues.cuh"

namespace fmoe {

// The x rows first … first + NR − 1 of expert x's GEMM0 into a TileSource operand (ptr, valid; rows past `rows`
// read nothing): the token's x row, or (ranks, a routed expert) the row this rank received, in row order.
template <int NR>
FMOE_DEVICE void gemm0_x_rows(const Params &p, const Layout &L, int x, bool shared, int rows, int first,
                              const char **ptr, bool *valid) {
#pragma unroll
    for (int i = 0; i < NR / 32; ++i) {
        const int r = loader_row(i);
        valid[i] = first + r < rows;
        if (RANKS > 1 && !shared) {
            const size_t row = (size_t)(L.row_start[x] + (valid[i] ? first + r : 0));
            ptr[i] = (const char *)(p.peers[p.rank].recv + row * H);
        } else {
            int token = 0;
            if (valid[i]) token = shared ? first + r : p.row_token[L.row_start[x] + first + r];
            ptr[i] = (const char *)(p.x + (size_t)token * H);
        }
    }
}

// GEMM0's epilogue for a staged tile c (NR rows, stride CS): h columns col0 … col0 + OUT_COLS − 1 of expert x's rows
// first … (of `rows`), activated (gated: activation(gate) · up, the up half OUT_COLS columns after the gate half;
// plain: with b1).
template <int NR, int CS, int OUT_COLS>
FMOE_DEVICE void gemm0_store(const Params &p, const Layout &L, int x, int rows, int first, int col0, const float *c) {
    const bool shared = is_shared(L, x);
    const int inter = shared ? IS : I;
    T *out = h_rows(p, L, x);
    for (int u = FMOE_TID; u < NR * OUT_COLS / 4; u += THREADS) {
        const int r = u / (OUT_COLS / 4), c4 = (u % (OUT_COLS / 4)) * 4;
        const int col = col0 + c4;
        if (first + r >= rows || col >= inter) continue;
        float v[4];
        if (GATED) {
            // activation_fast where the thread's 4 gate values allow it (activation.cuh): the same bits without the
            // IEEE division's per-quotient range check and branch. A small gain, mostly within the runs' spread:
            // mixtral-8x7b S = 4096 bf16 5.302 → 5.108 ms, qwen3-30b-a3b S = 16384 3.072 → 3.055, S = 4096 −2.3 to
            // +0.4 % over three pairs, deepseek-v3 unchanged (H100, Benchmarks/RESULTS.md "Round 38").
            float g[4];
            SiluFastRange range;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                g[q] = c[r * CS + c4 + q];
                range.add(g[q]);
            }
            if (range.ok()) {
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = activation_fast(g[q]) * c[r * CS + OUT_COLS + c4 + q];
            } else {
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = activation(g[q]) * c[r * CS + OUT_COLS + c4 + q];
            }
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float b = (!shared && p.b1 != nullptr) ? p.b1[(size_t)x * I + col + q] : 0.f;
                v[q] = activation(c[r * CS + c4 + q] + b);
            }
        }
        store4(out + (size_t)(first + r) * inter + col, v[0], v[1], v[2], v[3]);
    }
}

// ---- Half tiles ---------------------------------------------------------------------------------------------------
// FMOE_HALF_TILES (wgmma builds in tf32, bf16 and fp16 on one GPU; ignored elsewhere: the ranks kernels are at the
// register limit, and a gated E = 256 one spilled 12 bytes with half tiles): 1 (default), a wide tile whose row block
// has at most 64 rows (an expert's last, partial block) runs as one 64 × 256 tile (HalfEngine: each warpgroup m64n128
// on its half of the tile's weight rows, both on the same 64 A rows) instead of a 128 × 256 tile whose lower half is
// zero rows: half the tensor work, 40 instead of 48 KB loaded a k-slice. Each output element is the same wgmma k-steps
// in the same K order as in the wide tile, so the same bits. 0: every row block runs wide tiles. Half the math is not
// half the time, since a k-slice still loads the 256 weight rows: the experts' last blocks' GEMM0 tiles took 22.3 µs
// on average instead of 25.2, their GEMM1 tiles 10.1 instead of 10.2 (qwen3-30b-a3b S = 16384, trace; the means
// include last blocks of more than 64 rows). The layer (H200, Benchmarks/RESULTS.md, round 17): deepseek-v3 S = 4096
// 8.99 → 8.69 and 8.98 → 8.56 ms, paper-e64 S = 8192 0.713 → 0.698, paper-e32 0.629 → 0.616, qwen3-30b-a3b S = 64
// 0.353 → 0.345; qwen3-30b-a3b S = 4096 and 16384 and mixtral-8x7b within their spread.
#define FMOE_HALF_TILES_BUILT (FMOE_WGMMA && FMOE_PREC >= 1 && FMOE_PREC <= 3 && FMOE_RANKS == 1)
#if FMOE_HALF_TILES_BUILT
#ifndef FMOE_HALF_TILES
#define FMOE_HALF_TILES 1
#endif
typedef WgmmaDecodeEngine<MMA, EBN> HalfEngine;
constexpr int HALF_STAGES = EXPERT_RING_BYTES / ((HalfEngine::BM + HalfEngine::BN) * ROW_BYTES);
static_assert(HALF_STAGES >= 3 && HalfEngine::BM * HalfEngine::C_STRIDE * 4 <= EXPERT_RING_BYTES,
              "the half tiles' ring and staged tile live in the expert ring");
// Whether wide tile row block m (first row row0) of an expert with `rows` rows runs as a half tile (block-uniform).
FMOE_DEVICE bool half_tile(int rows, int row0) { return FMOE_HALF_TILES != 0 && rows - row0 <= HalfEngine::BM; }

// GEMM0 wide tile (x, m, n) as a half tile: the same weight rows and epilogue (gemm0_store), 64 x rows.
FMOE_DEVICE void gemm0_half(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x), row0 = m * BM;
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
    TileSource src;
    src.k_bytes = H * (int)sizeof(T);
    gemm0_x_rows<HalfEngine::BM>(p, L, x, shared, rows, row0, src.a, src.a_valid);
    point_rows<EBN>(src.b, src.b_valid, w, n * EBN, shared ? N0S : N0, H);
    gemm_tile_wgmma<HalfEngine, HALF_STAGES>(smem, src);
    constexpr int OUT_COLS = GATED ? EBN / 2 : EBN;
    gemm0_store<HalfEngine::BM, HalfEngine::C_STRIDE, OUT_COLS>(p, L, x, rows, row0, n * OUT_COLS,
                                                                 (const float *)smem);
    sync_block();  // the staged tile is read before the ring is loaded again
}
#else
FMOE_DEVICE bool half_tile(int, int) { return false; }
FMOE_DEVICE void gemm0_half(const Params &, const Layout &, int, int, int, char *) {}
#endif

FMOE_DEVICE void gemm0_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x);
    const int row0 = m * BM;
    if (half_tile(rows, row0)) {
        gemm0_half(p, L, x, m, n, smem);
        return;
    }
    const int n0 = shared ? N0S : N0;
    TileSource src;
    src.k_bytes = H * (int)sizeof(T);
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
#if FMOE_PREC == 4
    if (!shared) gemm0_tile_fp8(p, L, x, rows, m, n, smem);  // phase_fp8.cuh
    else
#endif
    {
        gemm0_x_rows<BM>(p, L, x, shared, rows, row0, src.a, src.a_valid);
        point_rows<EBN>(src.b, src.b_valid, w, n * EBN, n0, H);
#if FMOE_ACC_EPILOGUES
        if (FMOE_REG_EPILOGUE >= 2) {
            gemm_tile_wgmma_acc<SharedEngine, STAGES>(
                smem, src, [&](const float *acc) { gemm0_store_acc(p, L, x, m, n, acc); });
            return;
        }
#endif
        run_tile<SharedEngine>(smem, src);
    }
    constexpr int OUT_COLS = GATED ? EBN / 2 : EBN;
    gemm0_store<BM, c_stride<EBN>(), OUT_COLS>(p, L, x, rows, row0, n * OUT_COLS, (const float *)smem);
    sync_block();
}

// GEMM1's epilogue for a staged tile c (NR rows, stride CS): columns col0 … col0 + NC − 1 of rows first … of expert
// x, plus b2, into its rows (one GPU: RetT; the shared expert's FP32) or the source rank's return buffer (ranks).
template <int NR, int CS, int NC>
FMOE_DEVICE void gemm1_store(const Params &p, const Layout &L, int x, bool shared, int rows, int first, int col0,
                             const float *c) {
    float *out = f32_rows(p, L, x, shared);
#if FMOE_NVSHMEM
    bool sent_remote = false;  // this thread put returns to a remote source
#endif
    for (int u = FMOE_TID; u < NR * NC / 4; u += THREADS) {
        const int r = u / (NC / 4), c4 = (u % (NC / 4)) * 4;
        const int col = col0 + c4;
        if (first + r >= rows || col >= H) continue;
        float4 v = *(const float4 *)&c[r * CS + c4];
        if (!shared && p.b2 != nullptr) {
            const float *b = p.b2 + (size_t)x * H + col;
            v.x += b[0]; v.y += b[1]; v.z += b[2]; v.w += b[3];
        }
        if (RANKS > 1 && !shared) {
            // Ranks: straight into the source's return buffer, at the (token, j) pair the row came from.
            const int o = p.peers[p.rank].row_origin[L.row_start[x] + first + r];
#if FMOE_NVSHMEM
            static_assert(!FMOE_RET_STORAGE, "the NVSHMEM transport returns FP32 rows only (no storage returns)");
            if (nv_remote(p.peers[p.rank].sync, o >> PAIR_BITS)) {
                // A remote source: four single-float puts, completed below before the tile is counted done.
                float *d = &p.peers[o >> PAIR_BITS].ret[(size_t)(o & PAIR_MASK) * H + col];
                nvshmem_float_p(d, v.x, o >> PAIR_BITS); nvshmem_float_p(d + 1, v.y, o >> PAIR_BITS);
                nvshmem_float_p(d + 2, v.z, o >> PAIR_BITS); nvshmem_float_p(d + 3, v.w, o >> PAIR_BITS);
                sent_remote = true;
                continue;
            }
#endif
            store_ret4(&p.peers[o >> PAIR_BITS].ret[(size_t)(o & PAIR_MASK) * H + col], v);
        } else if (FMOE_RET_T && !shared) {
            store_ret4(&p.ybuf[(size_t)(L.row_start[x] + first + r) * H + col], v);
        } else {
            *(float4 *)&out[(size_t)(first + r) * H + col] = v;
        }
    }
#if FMOE_NVSHMEM
    if (sent_remote) nv_complete_puts();  // returns to remote sources delivered before this tile counts as done
#endif
}

// GEMM1 wide tile (x, m, n) as a half tile (see gemm0_half): 64 h rows, the tile's 256 W2 rows, gemm1_store. The
// operands are gemm1_source's with 64 A rows, formed inline as in gemm1_task: calling a gemm1_source templated on
// its rows changed the code of the measured default kernels (NVRTC 13.0, round 17).
#if FMOE_HALF_TILES_BUILT
FMOE_DEVICE void gemm1_half(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x), row0 = m * BM, inter = shared ? IS : I;
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    TileSource src;
    src.k_bytes = inter * (int)sizeof(T);
    point_rows<HalfEngine::BM>(src.a, src.a_valid, h_rows(p, L, x), row0, rows, inter);
    point_rows<EBN>(src.b, src.b_valid, w, n * EBN, H, inter);
    gemm_tile_wgmma<HalfEngine, HALF_STAGES>(smem, src);
    gemm1_store<HalfEngine::BM, HalfEngine::C_STRIDE, EBN>(p, L, x, shared, rows, row0, n * EBN, (const float *)smem);
    sync_block();
}
#else
FMOE_DEVICE void gemm1_half(const Params &, const Layout &, int, int, int, char *) {}
#endif

// The operands of GEMM1 wide tile (x, m, n): the row block's h rows and the tile's 256 W2 rows (output columns), for
// chain_tiles. gemm1_task forms the same operands inline: calling this from it changed the default kernels' code
// (NVRTC 13.0), and the default is the measured kernel.
FMOE_DEVICE void gemm1_source(const Params &p, const Layout &L, int x, int m, int n, TileSource &src) {
    const bool shared = is_shared(L, x);
    const int inter = shared ? IS : I;
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    src.k_bytes = inter * (int)sizeof(T);
    point_rows<BM>(src.a, src.a_valid, h_rows(p, L, x), m * BM, task_rows(p, L, x), inter);
    point_rows<EBN>(src.b, src.b_valid, w, n * EBN, H, inter);
}

FMOE_DEVICE void gemm1_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x);
    const int row0 = m * BM;
    if (half_tile(rows, row0)) {
        gemm1_half(p, L, x, m, n, smem);
        return;
    }
    const int inter = shared ? IS : I;
    const T *a = h_rows(p, L, x);
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    TileSource src;
    src.k_bytes = inter * (int)sizeof(T);
#if FMOE_PREC == 4
    if (!shared) gemm1_tile_fp8(p, L, x, rows, m, n, smem);  // phase_fp8.cuh
    else
#endif
    {
        point_rows<BM>(src.a, src.a_valid, a, row0, rows, inter);
        point_rows<EBN>(src.b, src.b_valid, w, n * EBN, H, inter);
#if FMOE_ACC_EPILOGUES
        if (FMOE_REG_EPILOGUE >= 1) {
            gemm_tile_wgmma_acc<SharedEngine, STAGES>(
                smem, src, [&](const float *acc) { gemm1_store_acc(p, L, x, m, n, acc); });
            return;
        }
#endif
        run_tile<SharedEngine>(smem, src);
    }
    gemm1_store<BM, c_stride<EBN>(), EBN>(p, L, x, shared, rows, row0, n * EBN, (const float *)smem);
    sync_block();
}

// ---- Chained wide tiles --------------------------------------------------------------------------------------------
// FMOE_CHAIN1 (16-bit sm_90a builds on one GPU, where the register epilogues exist; ignored elsewhere, and at decode):
// the GEMM1 column tiles one ticket runs. 1 (default): one. 2 – 4: column tiles n … n + CHAIN1 − 1 of one row block
// (one ticket, one ring wait), back to back in chain_tiles: once a tile's last wgmma has retired, the next tile's
// first k-slices load while this one stores its rows from the accumulators and is counted. 0: 2 where a GEMM1 tile
// is short (I ≤ 2048) and the kernel has no shared expert, else 1. Why: between GEMM1 tiles a block idles 4.4 µs
// beside qwen3-30b-a3b S = 4096's 11 µs tiles (ticket, ring wait, count; trace, H200). Measured (round 16, a first
// form whose every wgmma tile ran the mainloop as two functions; Benchmarks/RESULTS.md): pairs took qwen3-30b-a3b
// S = 16384 2.947 → 2.766 and 3.126 → 2.809 ms, S = 4096 0.847 → 0.834, paper-e64 S = 8192 0.717 → 0.709; no gain on
// deepseek-v3 (whose kernel spills 12 bytes with them) and mixtral-8x7b 5.25 → 5.36 (I = 14336: long tiles, a
// coarser last wave); 4 no better than 2. This form (wgmma_mainloop in parts), measured in round 17 beside the half
// tiles: qwen3-30b-a3b S = 4096 0.853 → 0.849 and 0.854 → 0.840 ms, paper-e64 0.698 → 0.696, but S = 16384 2.912 →
// 2.983 and 2.908 → 2.993: not the default.
// GEMM0 tiles chained with GEMM0's register epilogue measured 5 – 15 % slower except at qwen3-30b-a3b S = 16384 (that
// epilogue is slower than the staged one); chained with GEMM0's h staged as 16-bit values in the ring's last stage
// they spilled (a small gated kernel, NVRTC 13.0), and that staging unchained measured no faster (round 17, removed).
#if FMOE_ACC_EPILOGUES
#ifndef FMOE_CHAIN1
#define FMOE_CHAIN1 1
#endif
static_assert(FMOE_CHAIN1 >= 0 && FMOE_CHAIN1 <= 4, "FMOE_CHAIN1 is 0 (chosen by the shape) or 1 to 4 tiles");
constexpr int CHAIN1_WANTED = FMOE_CHAIN1 != 0 ? FMOE_CHAIN1 : (I <= 2048 && IS == 0 ? 2 : 1);
constexpr int CHAIN1 = NT1 % CHAIN1_WANTED == 0 ? CHAIN1_WANTED : 1;  // a row block's column tiles in whole chains

// Runs wide GEMM1 tiles 0 … count − 1 back to back:
// tile(i) names tile i as (expert, row block, column tile), source(t, src) gives its operands, store(t, acc) its
// epilogue from the accumulators, done(t) counts it (each run by every thread, block-uniform). Tile i + 1's first
// loads (wgmma_mainloop part 1) are issued after tile i's closing barrier (the ring is free) and before store(i), so
// they fly during the store and the count; part 2 zeroes the accumulators, after store(i) has read them.
template <class Tile, class Source, class Store, class Done>
FMOE_DEVICE void chain_tiles(char *smem, int count, Tile tile, Source source, Store store, Done done) {
    SharedEngine eng;
    TileSource src;
    int3 t = tile(0);
    source(t, src);
    wgmma_mainloop<SharedEngine, STAGES, 1>(smem, src, eng);
    for (int i = 0; i < count; ++i) {
        {
            FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, t.x, t.y, t.z);
            wgmma_mainloop<SharedEngine, STAGES, 2>(smem, src, eng);
            if (i + 1 < count) {
                source(tile(i + 1), src);
                wgmma_mainloop<SharedEngine, STAGES, 1>(smem, src, eng);
            }
            store(t, (const float *)eng.acc);
        }
        FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, t.x, t.y, t.z);
        done(t);
        if (i + 1 < count) {
            // Named and formed again rather than kept: nothing of the next tile holds registers during the store.
            t = tile(i + 1);
            source(t, src);
        }
    }
}
#else
constexpr int CHAIN1 = 1;
#endif

}  // namespace fmoe

// The decode tiles: a launch with few rows runs each expert tile as narrower tiles of 64 or 128 weight rows
// (gemm0_decode, gemm1_decode), and an expert of a few rows as a GEMV (gemv_task), each with the wide tiles'
// epilogues (expert_tiles.cuh). The scheduler that hands them out is phase_experts.cuh. See moe.cu (phase 3).
#pragma once
#include "expert_tiles.cuh"
#include "gemv.cuh"

namespace fmoe {

// A launch with at most half as many 128 × 256 GEMM0 tiles as blocks (decode: a few rows of a few experts) runs
// every expert tile as EBN / D tiles of D weight rows (D = 64 or 128: FMOE_DECODE_ROWS below; WgmmaDecodeEngine,
// wgmma.cuh), 64 rows at a time: more tiles, so every SM streams weights, and half the zero rows per tile. The bits
// are the wide tiles' (every output element is the same instructions in the same K order). The choice is per launch
// and block-uniform (every block holds the same task space). FMOE_DECODE_TILES: 1 (default) chooses; 0 never and
// 2 always split (A/B runs).
#ifndef FMOE_DECODE_TILES
#define FMOE_DECODE_TILES 1
#endif
// FMOE_DECODE_ROWS: the weight rows of a decode tile: 0 (default): both engines in the kernel, each launch taking
// 64 rows when four tiles per wide tile fit in one wave of the grid and 128 (m64n64 a warpgroup, half the tiles)
// otherwise (decode_split); 64 or 128: that width only (A/B runs). A decode tile's time is not its bytes: a k-slice
// takes about 0.32 µs whether its weights come from HBM or, prefetched, from L2 (Benchmarks/RESULTS.md, round 11),
// so 128 rows move about twice the bytes a slice. Same bits either way. Chosen per launch, qwen3-30b-a3b S = 1
// takes 0.059 ms (64 rows: 0.069, 192 tiles in two waves; 128: 0.061) and paper-e64 S = 1 0.047 (64 rows: 0.050;
// 128: 0.054, 32 tiles leave SMs idle); S = 8, 64, 4096 and mixtral-8x7b and deepseek-v3 at S = 1 measured the same
// (H200, 2026-12-02, Benchmarks/RESULTS.md "Round 12").
#ifndef FMOE_DECODE_ROWS
#define FMOE_DECODE_ROWS 0
#endif
static_assert(FMOE_DECODE_ROWS == 0 || FMOE_DECODE_ROWS == 64 || FMOE_DECODE_ROWS == 128,
              "FMOE_DECODE_ROWS is 64, 128 or 0 (both)");
#if FMOE_WGMMA && FMOE_PREC >= 1 && FMOE_PREC <= 3
// The largest split a launch may take (64-row tiles unless only 128 is built).
constexpr int DECODE_SPLIT = EBN / (FMOE_DECODE_ROWS == 128 ? 128 : 64);
// The ring's depth: as many stages as fit (12 in bf16 with 64 rows, 8 with 128), at most FMOE_DECODE_STAGES_MAX
// (16; lower for A/B runs). Bytes in flight matter: qwen3-30b-a3b S = 1 bf16 took 0.063 ms with 12 stages, 0.067
// with 6, 0.069 with 4 (H200, 2026-12-02).
#ifndef FMOE_DECODE_STAGES_MAX
#define FMOE_DECODE_STAGES_MAX 16
#endif
// The decode tiles of D weight rows: their engine and ring.
template <int D> struct DecodeTiles {
    typedef WgmmaDecodeEngine<MMA, D> Engine;
    static constexpr int SPLIT = EBN / D;
    static constexpr int STAGE_BYTES = (Engine::BM + Engine::BN) * ROW_BYTES;
    static constexpr int STAGES = EXPERT_RING_BYTES / STAGE_BYTES < FMOE_DECODE_STAGES_MAX
                                      ? EXPERT_RING_BYTES / STAGE_BYTES
                                      : FMOE_DECODE_STAGES_MAX;
    static_assert(STAGES >= 3 && Engine::BM * Engine::C_STRIDE * 4 <= EXPERT_RING_BYTES,
                  "the decode tiles' ring and staged tile live in the expert ring");
};

// Weight row of GEMM0 decode tile q (D rows) of expert tile n for the tile's row r (0 … D − 1): gated, the D/2 gate
// rows q·D/2 … then the D/2 up rows that pair with them, EBN/2 further in the packing; plain, the D rows q·D ….
// (A macro: the same expression written out as a function changed the sm_90a kernels' code, NVRTC 13.0.)
#define DECODE_W1_ROW(D, n, q, r)                                                                                   \
    (GATED ? (n) * EBN + ((r) < (D) / 2 ? (q) * ((D) / 2) + (r) : EBN / 2 + (q) * ((D) / 2) + (r) - (D) / 2)        \
           : (n) * EBN + (q) * (D) + (r))

// GEMM0 decode tile q of expert tile n: weight rows DECODE_W1_ROW(D, n, q, 0 … D − 1), over row block m in passes
// of 64.
template <int D>
FMOE_DEVICE void gemm0_decode(const Params &p, const Layout &L, int x, int m, int n, int q, char *smem) {
    typedef typename DecodeTiles<D>::Engine DecodeEngine;
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n * DecodeTiles<D>::SPLIT + q);
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x);
    const int n0 = shared ? N0S : N0;
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
    constexpr int OUT_COLS = GATED ? DecodeEngine::BN / 2 : DecodeEngine::BN;
    const int col0 = n * (GATED ? EBN / 2 : EBN) + q * OUT_COLS;
    if (col0 >= (shared ? IS : I)) return;  // block-uniform: past the last column
    for (int r0 = m * BM; r0 < rows && r0 < (m + 1) * BM; r0 += DecodeEngine::BM) {
        TileSource src;
        src.k_bytes = H * (int)sizeof(T);
        gemm0_x_rows<DecodeEngine::BM>(p, L, x, shared, rows, r0, src.a, src.a_valid);
#pragma unroll
        for (int i = 0; i < DecodeEngine::BN / 32; ++i) {
            const int r = loader_row(i);
            const int wrow = DECODE_W1_ROW(D, n, q, r);
            src.b_valid[i] = wrow < n0;
            src.b[i] = (const char *)(w + (size_t)(src.b_valid[i] ? wrow : 0) * H);
        }
        gemm_tile_wgmma<DecodeEngine, DecodeTiles<D>::STAGES>(smem, src);
        gemm0_store<DecodeEngine::BM, DecodeEngine::C_STRIDE, OUT_COLS>(p, L, x, rows, r0, col0, (const float *)smem);
        sync_block();  // the staged tile is read before the next pass loads into the ring
    }
}

// GEMM1 decode tile q of expert tile n: output columns n·EBN + q·D …, over row block m in passes of 64.
template <int D>
FMOE_DEVICE void gemm1_decode(const Params &p, const Layout &L, int x, int m, int n, int q, char *smem) {
    typedef typename DecodeTiles<D>::Engine DecodeEngine;
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n * DecodeTiles<D>::SPLIT + q);
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x);
    const int inter = shared ? IS : I;
    const T *a = h_rows(p, L, x);
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    const int col0 = n * EBN + q * DecodeEngine::BN;
    if (col0 >= H) return;  // block-uniform: past the last column
    for (int r0 = m * BM; r0 < rows && r0 < (m + 1) * BM; r0 += DecodeEngine::BM) {
        TileSource src;
        src.k_bytes = inter * (int)sizeof(T);
        point_rows<DecodeEngine::BM>(src.a, src.a_valid, a, r0, rows, inter);
        point_rows<DecodeEngine::BN>(src.b, src.b_valid, w, col0, H, inter);
        gemm_tile_wgmma<DecodeEngine, DecodeTiles<D>::STAGES>(smem, src);
        gemm1_store<DecodeEngine::BM, DecodeEngine::C_STRIDE, DecodeEngine::BN>(p, L, x, shared, rows, r0, col0,
                                                                                (const float *)smem);
        sync_block();
    }
}

// Whether a launch's decode split (EBN / 64 or EBN / 128, from decode_split) runs 64-row tiles, else 128-row ones:
// fixed by FMOE_DECODE_ROWS unless the kernel has both, so a width it was not built with is never called.
FMOE_DEVICE bool decode_rows64(int split) { return FMOE_DECODE_ROWS == 0 ? split == EBN / 64 : FMOE_DECODE_ROWS == 64; }

// The decode tile q of `split` of expert tile n, GEMM0 or GEMM1.
FMOE_DEVICE void gemm0_decode(const Params &p, const Layout &L, int x, int m, int n, int q, int split, char *smem) {
    if (decode_rows64(split)) gemm0_decode<64>(p, L, x, m, n, q, smem);
    else gemm0_decode<128>(p, L, x, m, n, q, smem);
}
FMOE_DEVICE void gemm1_decode(const Params &p, const Layout &L, int x, int m, int n, int q, int split, char *smem) {
    if (decode_rows64(split)) gemm1_decode<64>(p, L, x, m, n, q, smem);
    else gemm1_decode<128>(p, L, x, m, n, q, smem);
}

// The split of a launch that runs decode tiles: with both widths built, 64-row tiles (EBN / 64 per wide tile) when
// they all fit in one wave of the grid, else 128-row ones (at most half the blocks have a wide tile, so those fit).
FMOE_DEVICE int decode_split(int gemm0_tiles) {
    if (FMOE_DECODE_ROWS != 0) return DECODE_SPLIT;
    return (EBN / 64) * gemm0_tiles <= ctas() ? EBN / 64 : EBN / 128;
}
#else
constexpr int DECODE_SPLIT = 1;
FMOE_DEVICE void gemm0_decode(const Params &, const Layout &, int, int, int, int, int, char *) {}
FMOE_DEVICE void gemm1_decode(const Params &, const Layout &, int, int, int, int, int, char *) {}
FMOE_DEVICE int decode_split(int) { return 1; }
#endif

#if FMOE_PREC >= 2
// Tile n (or its decode part q of `split`) of GEMM `gemm` (0 or 1) of routed expert x, which has a few rows
// (gemv_expert), as a GEMV (gemv.cuh): the same weight rows and output columns as the tile it stands for, staged
// with stride GEMV_CS for the tile's own epilogue. Not inlined: one copy for both GEMMs, with registers of its own
// (inlined twice into a bf16 kernel it took paper-e64's with ranks from 236 registers to 255 and 4 bytes of spills
// on sm_90a).
__device__ __noinline__ void gemv_task(const Params &p, const Layout &L, int gemm, int x, int n, int q, int split,
                                       char *smem) {
    FMOE_TRACE_SCOPE(gemm == 0 ? FMOE_EV_GEMM0 : FMOE_EV_GEMM1, x, 0, n * split + q);
    const int rows = rows_of(L, x), tile_rows = EBN / split;
    const float *c = (const float *)smem;
    constexpr int WIDE_COLS = GATED ? EBN / 2 : EBN;  // GEMM0: h columns of a wide tile
    const int out_cols = WIDE_COLS / split;
    const int col0 = gemm == 0 ? n * WIDE_COLS + q * out_cols : n * EBN + q * tile_rows;
    if (col0 >= (gemm == 0 ? I : H)) return;  // block-uniform: a decode part past the last column
    // Weight rows: GEMM0 gated, the tile's gate rows, then the up rows that pair with them (EBN / 2 further in the
    // packing); otherwise the tile's rows in order (GEMM1: W2's rows are the output columns, from col0).
    GemvRows wr{n * EBN + q * tile_rows, 0, tile_rows};
    if (gemm == 0 && GATED) wr = GemvRows{n * EBN + q * out_cols, n * EBN + EBN / 2 + q * out_cols, out_cols};
    __shared__ GemvOperands op;
    gemv_operands(p, L, gemm, x, op);
    sync_block();
    gemv_tile(smem, op, tile_rows, wr);
    if (gemm == 0) {
        // (With both decode widths built, a launch may split a wide tile in two: 128-row parts.)
        if (split == 1) gemm0_store<GEMV_TOKENS, GEMV_CS, WIDE_COLS>(p, L, x, rows, 0, col0, c);
        else if (FMOE_DECODE_ROWS == 0 && split == EBN / 128)
            gemm0_store<GEMV_TOKENS, GEMV_CS, WIDE_COLS * 128 / EBN>(p, L, x, rows, 0, col0, c);
        else gemm0_store<GEMV_TOKENS, GEMV_CS, WIDE_COLS / DECODE_SPLIT>(p, L, x, rows, 0, col0, c);
    } else {
        if (split == 1) gemm1_store<GEMV_TOKENS, GEMV_CS, EBN>(p, L, x, false, rows, 0, col0, c);
        else if (FMOE_DECODE_ROWS == 0 && split == EBN / 128)
            gemm1_store<GEMV_TOKENS, GEMV_CS, 128>(p, L, x, false, rows, 0, col0, c);
        else gemm1_store<GEMV_TOKENS, GEMV_CS, EBN / DECODE_SPLIT>(p, L, x, false, rows, 0, col0, c);
    }
    sync_block();
}
#else
FMOE_DEVICE void gemv_task(const Params &, const Layout &, int, int, int, int, int, char *) {}
#endif

}  // namespace fmoe

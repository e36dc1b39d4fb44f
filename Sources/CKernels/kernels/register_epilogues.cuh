// The expert tiles' output rows and the epilogues that store a wide wgmma tile straight from its accumulators
// (gemm0_store_acc, gemm1_store_acc; FMOE_REG_EPILOGUE), shared by the cp.async engine's tiles (expert_tiles.cuh) and
// the TMA engine's consumers (phase_experts_tma.cuh). See moe.cu (phase 3).
#pragma once
#include "moe_params.cuh"

namespace fmoe {

// The first h row of expert x (task-space index): the shared expert's own buffer, or x's rows of hbuf.
FMOE_DEVICE T *h_rows(const Params &p, const Layout &L, int x) {
    return is_shared(L, x) ? p.hs : p.hbuf + (size_t)L.row_start[x] * I;
}

// Expert x's GEMM1 rows that are FP32 (one GPU): the shared expert's, and the routed ones unless they are RetT
// (FMOE_RET_STORAGE). RetT builds return ys whatever `shared` is: their epilogues store routed rows apart and read
// this only for the shared expert (a select on `shared` here added 128 bytes of code to those kernels, NVRTC 13.0).
FMOE_DEVICE float *f32_rows(const Params &p, const Layout &L, int x, bool shared) {
#if FMOE_RET_T
    return p.ys;
#else
    return shared ? p.ys : p.ybuf + (size_t)L.row_start[x] * H;
#endif
}

// FMOE_REG_EPILOGUE (16-bit sm_90a builds, one GPU; ignored elsewhere): 1 (default), the cp.async engine's wide GEMM1
// tiles store their FP32 rows straight from the accumulators (gemm1_store_acc) instead of staging the tile through
// shared memory and reading it back; 2, GEMM0's too (gemm0_store_acc, 16-byte stores); 0, both staged. Same bits.
// A GEMM1 tile took 10.8 µs instead of 13.2 (qwen3-30b-a3b S = 4096, trace) and the layer 0.902 → 0.863 ms, paper-e64
// S = 8192 0.725 → 0.710, qwen3-30b-a3b S = 16384 3.162 → 3.108; 2 was slower (GEMM0 tiles 28.5 against 27.9 µs,
// their counts' fences longer; qwen3-30b-a3b S = 64 0.370 → 0.425 ms) (H200, Benchmarks/RESULTS.md, round 16).
#if FMOE_WGMMA && (FMOE_PREC == 2 || FMOE_PREC == 3) && FMOE_RANKS == 1
#define FMOE_ACC_EPILOGUES 1
#ifndef FMOE_REG_EPILOGUE
#define FMOE_REG_EPILOGUE 1
#endif
#else
#define FMOE_ACC_EPILOGUES 0
#endif
// The stores from the accumulators also serve the fp8 TMA engine's consumers (phase_experts_tma_fp8.cuh), whose
// 128 × 256 tiles leave the same m64n256 layout; the cp.async fp8 tiles stage theirs (FMOE_ACC_EPILOGUES 0).
#if FMOE_ACC_EPILOGUES || (FMOE_TMA && FMOE_PREC == 4)
#define FMOE_ACC_STORES 1
#else
#define FMOE_ACC_STORES 0
#endif

#if FMOE_ACC_STORES
// The columns of a wide accumulator tile (m64n256: WgmmaEngine's, or the fp8 TMA engine's two 128-row halves).
constexpr int ACC_TILE_N = 256;
// The epilogues straight from a wide wgmma tile's accumulators (16-bit, one GPU): the TMA engine's consumers
// (phase_experts_tma.cuh) and, with FMOE_REG_EPILOGUE, the cp.async engine's tiles below. Same arithmetic as
// gemm0_store and gemm1_store, so the same bits.
FMOE_DEVICE u32 pack_t2(float a, float b) {
    return (u32)Storage<T>::store(a).bits | ((u32)Storage<T>::store(b).bits << 16);
}
// The gated h pair of accumulator registers c, c + 1 (WgmmaEngine's layout: the up column 128 after its gate
// column, register c + 64): act(gate) · up, packed as two T. Every register epilogue of a gated GEMM0 forms h here,
// so they round alike (gemm0_store's arithmetic).
FMOE_DEVICE u32 gated_pair(const float *acc, int c) {
    return pack_t2(activation(acc[c]) * acc[c + 64], activation(acc[c + 1]) * acc[c + 65]);
}

// Stores 16-bit values of a wide tile from its accumulators (WgmmaEngine's m64n256 layout, wgmma.cuh: register 4j + c
// holds row wgmma_acc_row() + 8·(c >> 1), column 8j + wgmma_acc_col() + (c & 1)): pair(c, col) packs the two values of
// registers c, c + 1 (output columns col, col + 1) as two T; each quad of lanes transposes its packed pairs so a lane
// stores 16 contiguous bytes (quad_transpose). Rows row0 + … of `out` (stride ld), columns col0 … of `cols`; cols is
// a multiple of 8, so a 16-byte column block is wholly inside or outside; row masks are store predicates only.
template <int OUT_COLS, class Pair>
FMOE_DEVICE void store_acc_pairs(T *out, int ld, int cols, int rows, int row0, int col0, Pair pair) {
    const int r0 = wgmma_acc_row();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
        const bool ok = row0 + r < rows;
        T *row = out + (size_t)(ok ? row0 + r : 0) * ld;
#pragma unroll
        for (int jg = 0; jg < OUT_COLS / 32; ++jg) {
            u32 w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int j = 4 * jg + i;
                w[i] = pair(4 * j + 2 * h, col0 + 8 * j + wgmma_acc_col());
            }
            const uint4 v = quad_transpose(w);
            const int col = col0 + 8 * (4 * jg + (int)(FMOE_TID & 3));
            if (ok && col < cols) *(uint4 *)(row + col) = v;
        }
    }
}

// GEMM0's epilogue from the accumulators, the arithmetic of gemm0_store: gated, act(gate) · up with the up column 128
// after its gate column (j + 16); plain, act(acc + b1). I is a multiple of 8.
FMOE_DEVICE void gemm0_store_acc(const Params &p, const Layout &L, int x, int m, int n, const float *acc) {
    const bool shared = is_shared(L, x);
    const int inter = shared ? IS : I;
    constexpr int OUT_COLS = GATED ? EBN / 2 : EBN;
    store_acc_pairs<OUT_COLS>(h_rows(p, L, x), inter, inter, task_rows(p, L, x), m * BM, n * OUT_COLS,
                              [&](int c, int col) {
                                  if (GATED) return gated_pair(acc, c);
                                  const bool bias = !shared && p.b1 != nullptr && col < inter;
                                  return pack_t2(activation(acc[c] + (bias ? p.b1[(size_t)x * I + col] : 0.f)),
                                                 activation(acc[c + 1] + (bias ? p.b1[(size_t)x * I + col + 1] : 0.f)));
                              });
}

#if FMOE_RET_T
// gemm1_store_acc's routed rows in the storage type (FMOE_RET_STORAGE): + b2, rounded as store_ret4 rounds.
template <int TN = ACC_TILE_N>
FMOE_DEVICE void gemm1_store_acc_t(const Params &p, const Layout &L, int x, int rows, int row0, int n,
                                   const float *acc) {
    const float *bias = p.b2 != nullptr ? p.b2 + (size_t)x * H : nullptr;
#if FMOE_TMA && FMOE_PREC == 4
    // The fp8 engine: each lane stores its own pairs (4 bytes; a quad's are 16 contiguous), with no transposed
    // registers beside the 128 accumulators: with them its 256-row storage-rows build spilled (deepseek-v3, NVRTC
    // 13.0). The same values, so the same bits.
    T *base = p.ybuf + (size_t)L.row_start[x] * H + n * EBN + wgmma_acc_col();
    const int cols = H - n * EBN - wgmma_acc_col();  // this lane's columns 8j (+1) exist while 8j < cols
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row0 + wgmma_acc_row() + 8 * h;
        if (r >= rows) continue;
        T *row = base + (size_t)r * H;
#pragma unroll
        for (int j = 0; j < TN / 8; ++j) {
            if (8 * j >= cols) continue;
            const int col = n * EBN + wgmma_acc_col() + 8 * j;
            const float b0 = bias != nullptr ? bias[col] : 0.f, b1 = bias != nullptr ? bias[col + 1] : 0.f;
            *(u32 *)(row + 8 * j) = pack_t2(acc[4 * j + 2 * h] + b0, acc[4 * j + 2 * h + 1] + b1);
        }
    }
#else
    store_acc_pairs<TN>(p.ybuf + (size_t)L.row_start[x] * H, H, H, rows, row0, n * EBN, [&](int c, int col) {
        const bool b = bias != nullptr && col < H;
        return pack_t2(acc[c] + (b ? bias[col] : 0.f), acc[c + 1] + (b ? bias[col + 1] : 0.f));
    });
#endif
}
#endif

// GEMM1's epilogue from the accumulators, gemm1_store's arithmetic: + b2 (routed, when present), FP32 rows (or
// RetT: gemm1_store_acc_t). The bias form is a loop of its own, so the plain one holds no bias loads in registers
// beside the 128 accumulators. TN: the tile's columns (the fp8 TMA engine's 128-row form: 128, 64 accumulators);
// n counts column tiles of EBN.
template <int TN = ACC_TILE_N>
FMOE_DEVICE void gemm1_store_acc(const Params &p, const Layout &L, int x, int m, int n, const float *acc) {
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x), row0 = m * BM;
#if FMOE_RET_T
    if (!shared) {
        gemm1_store_acc_t<TN>(p, L, x, rows, row0, n, acc);
        return;
    }
#endif
    float *out = f32_rows(p, L, x, shared) + n * EBN + wgmma_acc_col();
    const float *bias = !shared && p.b2 != nullptr ? p.b2 + (size_t)x * H + n * EBN + wgmma_acc_col() : nullptr;
    const int cols = H - n * EBN - wgmma_acc_col();  // this lane's columns 8j (+1) exist while 8j < cols
    const int r0 = wgmma_acc_row();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
        if (row0 + r >= rows) continue;
        float *row = out + (size_t)(row0 + r) * H;
        if (bias != nullptr) {
#pragma unroll
            for (int j = 0; j < TN / 8; ++j)
                if (8 * j < cols)
                    *(float2 *)(row + 8 * j) = make_float2(acc[4 * j + 2 * h] + bias[8 * j],
                                                           acc[4 * j + 2 * h + 1] + bias[8 * j + 1]);
        } else {
#pragma unroll
            for (int j = 0; j < TN / 8; ++j)
                if (8 * j < cols) *(float2 *)(row + 8 * j) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
        }
    }
}

#endif

}  // namespace fmoe

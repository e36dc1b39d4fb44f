// One 128×BN output tile of C = A·Bᵀ with both operands K-major (rows of A and rows of B are contiguous in K),
// FP32 accumulation. Every GEMM in the layer is such a tile: the gate (x·Wgᵀ), GEMM0 (x·W1ᵀ) and GEMM1 (h·W2ᵀ).
//
// Mainloop: a STAGES-deep cp.async ring in shared memory; each stage holds one 128-byte-wide k-slice of the 128
// A rows and 128 B rows (64 bf16/fp16 or 32 fp32 elements of K). Rows are 128 bytes and their 16-byte chunks are
// XOR-swizzled by (row mod 8), so ldmatrix and the FFMA path read conflict-free. Rows past the operand's extent
// and K past its end are zero-filled by cp.async (src-size 0), so partial tiles need no special code.
//
// Engines (chosen at compile time by the element type and the precision):
//   MmaEngine<BF16|F16|TF32>: 8 warps as 2 (M) × 4 (N), each warp 64×32 via mma.sync m16n8k16 (m16n8k8 for TF32)
//                            fed by ldmatrix.x4;
//   FfmaEngine:              exact FP32 fused multiply-adds, each lane an 8×8 block of its warp's 64×32.
// After the mainloop the accumulators are staged through shared memory as FP32 [128][BN + 4], so every epilogue
// (activation, gating, bias, conversion) is written once, independent of the engine's register layout.
#pragma once
#include "common.cuh"

namespace fmoe {

constexpr int BM = 128;        // tile rows (tokens), every engine
constexpr int THREADS = PHASE_THREADS;  // the threads that run the phases (common.cuh)
// Threads per block: the phases' and, FMOE_TMA builds, the TMA producer warpgroup (phase_experts_tma.cuh).
constexpr int BLOCK_THREADS = PHASE_THREADS + (FMOE_TMA ? 128 : 0);
constexpr int ROW_BYTES = 128; // one k-slice row
constexpr int MAX_BN = 256;

// Per tile width TBN (128 for the FFMA and mma.sync engines, 256 for wgmma):
template <int TBN> constexpr int stage_bytes() { return (BM + TBN) * ROW_BYTES; }  // A rows then B rows
template <int TBN> constexpr int c_stride() { return TBN + 4; }                     // staged FP32 row stride
template <int TBN> constexpr int c_bytes() { return BM * c_stride<TBN>() * 4; }

FMOE_DEVICE u32 swizzle(int row, int chunk) { return (u32)(row * ROW_BYTES + ((chunk ^ (row & 7)) << 4)); }

// Where a thread's BM/32 A rows and TBN/32 B rows come from. Thread t loads rows (t >> 3) + 32·i, chunk t & 7.
struct TileSource {
    const char *a[BM / 32];
    const char *b[MAX_BN / 32];
    bool a_valid[BM / 32];
    bool b_valid[MAX_BN / 32];
    int k_bytes;  // K × element size (a multiple of 16)
};

FMOE_DEVICE int loader_row(int i) { return (int)(FMOE_TID >> 3) + 32 * i; }

// Points this thread's loader rows of a ROWS-row operand (a or b of a TileSource) at rows first + loader_row(i) of
// `base` (`stride` elements each), from byte k0 on; rows at or past `limit` read nothing (zero-filled) and point at
// row 0, so no address is ever out of bounds.
template <int ROWS, class E>
FMOE_DEVICE void point_rows(const char **ptr, bool *valid, const E *base, int first, int limit, size_t stride,
                            int k0 = 0) {
#pragma unroll
    for (int i = 0; i < ROWS / 32; ++i) {
        const int r = first + loader_row(i);
        valid[i] = r < limit;
        ptr[i] = (const char *)(base + (size_t)(valid[i] ? r : 0) * stride) + k0;
    }
}

// One k-slice of a tile's TBM A rows and TBN B rows (the decode tiles of wgmma.cuh have TBM = 64); EVICT_B: the B
// rows (weights) with the L2 evict-first policy (FMOE_DECODE_EVICT_FIRST, common.cuh).
template <int TBN, int TBM = BM, bool EVICT_B = false>
FMOE_DEVICE void load_stage(char *stage, const TileSource &src, int kt) {
    const int chunk = FMOE_TID & 7;
    const int off = kt * ROW_BYTES + chunk * 16;
    const bool k_in = off < src.k_bytes;
    const u32 base_a = smem_addr(stage);
    const u32 base_b = base_a + TBM * ROW_BYTES;
#pragma unroll
    for (int i = 0; i < TBM / 32; ++i) {
        const int row = loader_row(i);
        const bool va = src.a_valid[i] && k_in;
        cp_async16(base_a + swizzle(row, chunk), va ? src.a[i] + off : src.a[i], va);
    }
#pragma unroll
    for (int i = 0; i < TBN / 32; ++i) {
        const int row = loader_row(i);
        const bool vb = src.b_valid[i] && k_in;
        const char *from = vb ? src.b[i] + off : src.b[i];
        if (EVICT_B) cp_async16_hint(base_b + swizzle(row, chunk), from, vb, l2_evict_first());
        else cp_async16(base_b + swizzle(row, chunk), from, vb);
    }
}

// TF32, one rule for both tensor-core engines: every operand element is rounded to the nearest TF32 value, ties
// away from zero (cvt.rna), before a tensor core reads it (mma.sync and wgmma would otherwise truncate). The weights
// (every tile's B operand) are rounded once by the host when the layer is created (FusedDeviceWeights), and the A
// operand of a tile (x rows, a rank's received rows, or h) in shared memory as its stage lands, by the thread that
// copied it (its own cp.async group is complete, so no barrier is needed before): the stage is the one place both
// engines read, so sm_80 and sm_90a round identically. Only the A half of a stage is rounded there (4 of a thread's
// 12 chunks at BN = 256): a pass over the whole stage cost paper-e64 TF32 60 % (2.15 vs 1.32 ms, H200,
// 2026-12-01).
FMOE_DEVICE void round4_tf32(char *p) {
    uint4 v = *(uint4 *)p;
    v.x = to_tf32(v.x); v.y = to_tf32(v.y); v.z = to_tf32(v.z); v.w = to_tf32(v.w);
    *(uint4 *)p = v;
}
template <int TBM = BM> FMOE_DEVICE void round_stage_tf32(char *stage) {
    const int chunk = FMOE_TID & 7;
#pragma unroll
    for (int i = 0; i < TBM / 32; ++i) round4_tf32(stage + swizzle(loader_row(i), chunk));
}

// ---- Tensor-core engine -----------------------------------------------------------------------------------------
enum MmaKind { MMA_BF16 = 0, MMA_F16 = 1, MMA_TF32 = 2 };

template <int KIND> struct MmaEngine {
    static constexpr bool WGMMA = false;
    static constexpr bool TF32_ROUND = KIND == MMA_TF32;  // stages are rounded by round_stage_tf32
    static constexpr int BN = 128;
    static constexpr int C_STRIDE = c_stride<BN>();
    float acc[4][4][4];  // [m16 tile][n8 tile][c0..c3]

    // d = 0 for a warp's 64 × 32 accumulators (acc, or Fp8MmaEngine's K-block temporary).
    FMOE_DEVICE static void zero_tile(float (&d)[4][4][4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) d[i][j][c] = 0.f;
    }
    FMOE_DEVICE void zero() { zero_tile(acc); }

    FMOE_DEVICE static void mma(float *d, const u32 *a, const u32 *b) {
        if (KIND == MMA_BF16) {
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
        } else if (KIND == MMA_F16) {
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
        } else {
            asm volatile(
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
        }
    }

    // d += one stage into the warp's 64 × 32 accumulators d: 4 k-steps of two 16-byte chunks each (k16 for 16-bit
    // types, k8 for TF32, k32 for E4M3: the fragments hold the same bytes), each an `mma_op(d_tile, a, b)` per m16 ×
    // n8 tile. MmaEngine's and Fp8MmaEngine's (mma_fp8.cuh) mainloop step.
    template <class MmaOp> FMOE_DEVICE static void compute_into(const char *stage, float (&d)[4][4][4], MmaOp mma_op) {
        const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
        const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
        const u32 base_a = smem_addr(stage), base_b = base_a + BM * ROW_BYTES;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int row = wm + mi * 16 + (lane & 15);
                ldmatrix_x4(base_a + swizzle(row, ks * 2 + (lane >> 4)), a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
            }
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const int row = wn + p * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(base_b + swizzle(row, ks * 2 + ((lane >> 3) & 1)), b[2 * p][0], b[2 * p][1],
                            b[2 * p + 1][0], b[2 * p + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_op(d[mi][ni], a[mi], b[ni]);
        }
    }

    // One stage into acc.
    FMOE_DEVICE void compute(const char *stage) {
        compute_into(stage, acc, [](float *d, const u32 *a, const u32 *b) { mma(d, a, b); });
    }

    // Accumulator layout of m16n8: c0,c1 at (g, 2t..2t+1), c2,c3 at (g+8, 2t..2t+1), g = lane/4, t = lane%4.
    FMOE_DEVICE void stage_out(float *c) const {
        const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
        const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int row = wm + mi * 16 + g, col = wn + ni * 8 + 2 * t;
                *(float2 *)&c[row * C_STRIDE + col] = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
                *(float2 *)&c[(row + 8) * C_STRIDE + col] = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
            }
    }
};

// ---- Exact FP32 engine ------------------------------------------------------------------------------------------
// Lane (rg, cg) = (lane / 4, lane % 4) of a warp owns rows wm + rg + 8·r and cols wn + cg + 4·c (r, c < 8): the
// strided ownership puts the 8 rows a k-step reads in 8 different swizzle classes, so the loads do not conflict.
struct FfmaEngine {
    static constexpr bool WGMMA = false;
    static constexpr bool TF32_ROUND = false;
    static constexpr int BN = 128;
    static constexpr int C_STRIDE = c_stride<BN>();
    float acc[8][8];

    FMOE_DEVICE void zero() {
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
            for (int c = 0; c < 8; ++c) acc[r][c] = 0.f;
    }

    FMOE_DEVICE void compute(const char *stage) {
        const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
        const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
        const int rg = lane >> 2, cg = lane & 3;
        const char *sa = stage, *sb = stage + BM * ROW_BYTES;
#pragma unroll 4
        for (int k = 0; k < 32; ++k) {
            const int chunk = k >> 2, word = (k & 3) * 4;
            float a[8], b[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) a[r] = *(const float *)(sa + swizzle(wm + rg + 8 * r, chunk) + word);
#pragma unroll
            for (int c = 0; c < 8; ++c) b[c] = *(const float *)(sb + swizzle(wn + cg + 4 * c, chunk) + word);
#pragma unroll
            for (int r = 0; r < 8; ++r)
#pragma unroll
                for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
        }
    }

    FMOE_DEVICE void stage_out(float *c) const {
        const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
        const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
        const int rg = lane >> 2, cg = lane & 3;
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
            for (int cc = 0; cc < 8; ++cc) c[(wm + rg + 8 * r) * C_STRIDE + wn + cg + 4 * cc] = acc[r][cc];
    }
};

// Runs the mainloop for one tile and leaves the FP32 result in shared memory at `smem` ([BM][c_stride<BN>]).
// All threads of the block must call it. On return the block is synchronised and the staged tile is readable.
template <class Engine, int STAGES> FMOE_DEVICE void gemm_tile(char *smem, const TileSource &src) {
    constexpr int STAGE_BYTES = stage_bytes<Engine::BN>();
    Engine eng;
    eng.zero();
    const int ktiles = (src.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage<Engine::BN>(smem + s * STAGE_BYTES, src, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        if (Engine::TF32_ROUND) round_stage_tf32(smem + (kt % STAGES) * STAGE_BYTES);
        sync_block();  // stage kt landed (and is rounded) for everyone; everyone is done reading stage kt − 1
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_stage<Engine::BN>(smem + (next % STAGES) * STAGE_BYTES, src, next);
        cp_async_commit();
        eng.compute(smem + (kt % STAGES) * STAGE_BYTES);
    }
    cp_async_wait<0>();
    sync_block();  // the ring is free: reuse it for the staged accumulators
    eng.stage_out((float *)smem);
    sync_block();
}

}  // namespace fmoe

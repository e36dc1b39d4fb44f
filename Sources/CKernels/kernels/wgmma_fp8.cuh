// Precision fp8 (FMOE_PREC == 4) on sm_90a: E4M3 × E4M3 warpgroup MMA with per-K-block scale promotion (fp8.cuh
// holds what it shares with mma_fp8.cuh). The arithmetic is docs/fp8.md's; the CPU oracle
// (Sources/FlashMoE/Reference/OracleFP8.swift) computes the same.
//
// Activations are quantized once, not in the mainloop: x per token before the grid barrier, h per row block by the
// block that completes the row block's GEMM0 (phase_fp8.cuh). A tile then reads E4M3 codes for both operands, so a
// stage is gemm_tile.cuh's: 128 A rows and 128 B rows of 128 bytes (one 128-wide K block), 128-byte swizzled, filled
// by load_stage. Per K block each warpgroup issues 4 m64n128k32 instructions into a temporary accumulator (the
// first with scale-d = 0), waits, and promotes: acc += tmp · (a_scale[row] · b_scale[granule]) (or every
// FMOE_FP8_PROMOTE_STEPS instructions). A scales come per row and K block from the quantized activations; B scales
// per 64-row granule of the packed weight rows (gated: 64 gate rows, then 64 up rows) and K block, from the
// expert's weight image (host layout: FusedDeviceWeights+FP8.swift). 64 + 64 accumulator registers per thread.
// Overlapping one half of the weight rows' promotion with the other half's MMA (two m64n64 groups per K block,
// loads one block less ahead) gave the same bits but was 5–12 % slower on the H200 (246–254 registers against
// 208–216; Benchmarks/RESULTS.md, round 6): the per-block wait is not what bounds this loop.
#pragma once
#include "common.cuh"
#include "fp8.cuh"
#include "gemm_tile.cuh"
#include "wgmma.cuh"

namespace fmoe {

#define FMOE_ACC64 FMOE_ACC32(0), FMOE_ACC32(32)
#define FMOE_REGS64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9," FMOE_R8(1) FMOE_R8(2) FMOE_R8(3) FMOE_R8(4) FMOE_R8(5) \
                    "%60,%61,%62,%63}"

// d (+)= A·Bᵀ over k32, E4M3 operands from shared memory; scale_d = 0 overwrites d.
FMOE_DEVICE void wgmma_m64n128k32_e4m3(float *d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " FMOE_REGS64 ", %64, %65, p, 1, 1;\n}\n"
        : FMOE_ACC64
        : "l"(da), "l"(db), "r"(scale_d));
}

struct Fp8WgmmaEngine {
    static constexpr bool WGMMA = true;
    static constexpr int BN = FP8_BN;
    static constexpr int C_STRIDE = c_stride<BN>();
    float acc[64];
    float tmp[64];

    FMOE_DEVICE void zero() {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    }

    // tmp = the k32 steps [first, first + count) of the stage's K block (the first with scale-d = 0).
    FMOE_DEVICE void issue(const char *stage, int first, int count) {
        const int wg = FMOE_TID >> 7;
        const u32 a = smem_addr(stage) + wg * 64 * ROW_BYTES;
        const u32 b = smem_addr(stage) + BM * ROW_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = first; ks < first + count; ++ks)
            wgmma_m64n128k32_e4m3(tmp, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), ks - first);
        wgmma_commit();
    }

    // acc += tmp · a_scale(row) · b_scale(granule); the m64nN layout is WgmmaEngine's (wgmma.cuh): registers 4j + c
    // hold row (lane/4) + 8(c>>1), so s0 scales c = 0, 1 and s1 c = 2, 3; columns 8j … of granule j / 8.
    FMOE_DEVICE void promote(float s0, float s1, float b0, float b1) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const float b = j < BN / 16 ? b0 : b1;
            acc[4 * j] = fmaf(tmp[4 * j], s0 * b, acc[4 * j]);
            acc[4 * j + 1] = fmaf(tmp[4 * j + 1], s0 * b, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(tmp[4 * j + 2], s1 * b, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(tmp[4 * j + 3], s1 * b, acc[4 * j + 3]);
        }
    }

    FMOE_DEVICE void stage_out(float *c) const {
        const int wg = FMOE_TID >> 7, w = (FMOE_TID >> 5) & 3, lane = FMOE_TID & 31;
        const int row = wg * 64 + w * 16 + (lane >> 2), col = 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            *(float2 *)&c[row * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j], acc[4 * j + 1]);
            *(float2 *)&c[(row + 8) * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
        }
    }
};

// A K block's four scales (the thread's two rows', the tile's two granules').
struct Fp8BlockScales {
    float s0, s1, b0, b1;
    FMOE_DEVICE void load(const Fp8Scales &sc, int kt) {
        s0 = sc.a0 != nullptr ? sc.a0[kt] : 0.f;
        s1 = sc.a1 != nullptr ? sc.a1[kt] : 0.f;
        b0 = sc.b[kt];
        b1 = sc.granule1 ? sc.b[sc.kb_count + kt] : 0.f;
    }
};

// FMOE_FP8_SCALES_AHEAD 1 (default): a K block's scales are loaded one block ahead, into registers, so the
// promotion right after the block's MMA does not wait for four global loads (0: loaded in the block, before its
// MMA). The same values in the same arithmetic either way.
#ifndef FMOE_FP8_SCALES_AHEAD
#define FMOE_FP8_SCALES_AHEAD 1
#endif

// The fp8 mainloop over E4M3 A and B rows (src.k_bytes = K): loads run STAGES − 1 K blocks ahead; per K block one
// barrier (the block landed for everyone, and both warpgroups finished the previous block, whose stage is refilled
// right away), the block's MMA, a wait (the promotion needs the block's sums) and the promotion. Leaves the FP32
// tile in shared memory like gemm_tile.
template <int STAGES> FMOE_DEVICE void gemm_tile_fp8(char *smem, const TileSource &src, const Fp8Scales &sc) {
    static_assert(STAGES >= 2, "the fp8 pipeline needs at least 2 stages");
    constexpr int P = STAGES - 1, STAGE_BYTES = (BM + FP8_BN) * ROW_BYTES;
    Fp8WgmmaEngine eng;
    eng.zero();
    const int ktiles = (src.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
#pragma unroll
    for (int s = 0; s < P; ++s) {
        if (s < ktiles) load_stage<FP8_BN>(smem + s * STAGE_BYTES, src, s);
        cp_async_commit();
    }
    Fp8BlockScales ahead;  // FMOE_FP8_SCALES_AHEAD: K block kt's scales at iteration kt
    if (FMOE_FP8_SCALES_AHEAD && ktiles > 0) ahead.load(sc, 0);
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<P - 1>();
        fence_proxy_async();  // cp.async wrote the stage through the generic proxy; wgmma reads it through the async one
        sync_block();      // stage kt landed for everyone; both warpgroups are past block kt − 1
        const int next = kt + P;  // its slot is block kt − 1's, free after the barrier
        if (next < ktiles) load_stage<FP8_BN>(smem + (next % STAGES) * STAGE_BYTES, src, next);
        cp_async_commit();
        Fp8BlockScales bs = ahead;
        if (!FMOE_FP8_SCALES_AHEAD) bs.load(sc, kt);  // issued before the MMA, so part of the latency hides
        else if (kt + 1 < ktiles) ahead.load(sc, kt + 1);
        const float s0 = bs.s0, s1 = bs.s1, b0 = bs.b0, b1 = bs.b1;
        const char *stage = smem + (kt % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int part = 0; part < 4; part += FP8_PROMOTE_STEPS) {
            eng.issue(stage, part, FP8_PROMOTE_STEPS);
            wgmma_wait<0>();
            eng.promote(s0, s1, b0, b1);
        }
    }
    cp_async_wait<0>();
    sync_block();
    eng.stage_out((float *)smem);
    sync_block();
}

}  // namespace fmoe

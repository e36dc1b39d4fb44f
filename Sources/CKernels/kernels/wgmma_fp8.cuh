// Precision fp8 (FMOE_PREC == 4) on sm_90a: E4M3 × E4M3 warpgroup MMA with per-K-block scale promotion, and the
// quantization of activations to E4M3. The arithmetic is docs/fp8.md's; the CPU oracle
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
// loads one block less ahead) gave the same bits but was 5–11 % slower on the H200 (252 registers against 211;
// Benchmarks/RESULTS.md, round 6): the per-block wait is not what bounds this loop.
#pragma once
#include "common.cuh"
#include "gemm_tile.cuh"
#include "wgmma.cuh"

namespace fmoe {

// k32 steps summed on the tensor cores between promotions: 4 (once per K block, DeepGEMM's choice) by default.
// The FP8 MMA aligns its products and the partial sum it carries to 13 fraction bits and truncates; 1 promotes
// every step, so the partial sum leaves the alignment (docs/fp8.md: 1.5-2.4x closer to the oracle in a model, at
// three more waits per K block). An experiment: scripts/fp8_localise.py --promote-steps builds it through
// FLASHMOE_KERNEL_DIR.
#ifndef FMOE_FP8_PROMOTE_STEPS
#define FMOE_FP8_PROMOTE_STEPS 4
#endif
constexpr int FP8_PROMOTE_STEPS = FMOE_FP8_PROMOTE_STEPS;
static_assert(FP8_PROMOTE_STEPS == 1 || FP8_PROMOTE_STEPS == 2 || FP8_PROMOTE_STEPS == 4,
              "FMOE_FP8_PROMOTE_STEPS divides the 4 k32 steps of a K block");
constexpr int FP8_BN = 128;
constexpr int FP8_GROUP = 128;  // channels per activation scale, = the K block of the weight scales

// Two E4M3 codes (round to nearest even, saturating to ±448, NaN kept): `hi` in the upper byte.
FMOE_DEVICE unsigned short e4m3x2(float hi, float lo) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// One warp quantizes one group of n ≤ 128 consecutive BF16 values (n a multiple of 4; lane l holds values 4l … 4l
// + 3): scale = (largest finite |v|) / 448, or 1 when that is not positive; code = E4M3(v / scale), both divisions
// IEEE round-to-nearest (docs/fp8.md, Scales). `v` is the lane's 4 values (zeros past n, which leave the amax as
// it is); returns the lane's 4 codes (value 4l in the low byte) and sets `scale` on every lane.
FMOE_DEVICE u32 quantize_group4(const float v[4], float &scale) {
    float m = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float a = fabsf(v[q]);
        if (a <= 3.402823466e38f) m = fmaxf(m, a);  // finite values only: NaN and ±∞ fail the test
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = __fdiv_rn(m, 448.f);
    if (!(s > 0.f)) s = 1.f;
    scale = s;
    const unsigned short lo = e4m3x2(__fdiv_rn(v[1], s), __fdiv_rn(v[0], s));
    const unsigned short hi = e4m3x2(__fdiv_rn(v[3], s), __fdiv_rn(v[2], s));
    return (u32)lo | ((u32)hi << 16);
}

// The 4 BF16 values at `src` (8 bytes) as FP32.
FMOE_DEVICE void load_bf16x4(const void *src, float v[4]) {
    const uint2 w = *(const uint2 *)src;
    v[0] = __uint_as_float(w.x << 16);
    v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16);
    v[3] = __uint_as_float(w.y & 0xffff0000u);
}

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

// The scales of one fp8 tile: this thread's two accumulator rows' A scales ([K block], null for a row past the
// tile's rows: scale 0) and the B scales of the tile's two 64-row granules ([granule][K block], kb_count apart).
// The A scales are written in this launch (phase_fp8.cuh): plain loads, never the read-only cache.
struct Fp8Scales {
    const float *a0, *a1;
    const float *b;       // granule 0 of the tile at K block 0
    int kb_count;         // K blocks per granule row of scales
    bool granule1;        // whether the tile's second granule exists (else its scale reads as 0)
};

struct Fp8WgmmaEngine {
    static constexpr bool WGMMA = true;
    static constexpr bool FP8 = true;
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
        const int wg = threadIdx.x >> 7;
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
        const int wg = threadIdx.x >> 7, w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
        const int row = wg * 64 + w * 16 + (lane >> 2), col = 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            *(float2 *)&c[row * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j], acc[4 * j + 1]);
            *(float2 *)&c[(row + 8) * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
        }
    }
};

// This thread's first accumulator row of a 128-row tile (the second is 8 further): WgmmaEngine's layout.
FMOE_DEVICE int fp8_acc_row() { return (threadIdx.x >> 7) * 64 + ((threadIdx.x >> 5) & 3) * 16 + ((threadIdx.x & 31) >> 2); }

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
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<P - 1>();
        fence_proxy_async();  // cp.async wrote the stage through the generic proxy; wgmma reads it through the async one
        __syncthreads();      // stage kt landed for everyone; both warpgroups are past block kt − 1
        const int next = kt + P;  // its slot is block kt − 1's, free after the barrier
        if (next < ktiles) load_stage<FP8_BN>(smem + (next % STAGES) * STAGE_BYTES, src, next);
        cp_async_commit();
        // The scales' loads are issued before the MMA, so their latency hides behind it.
        const float s0 = sc.a0 != nullptr ? sc.a0[kt] : 0.f, s1 = sc.a1 != nullptr ? sc.a1[kt] : 0.f;
        const float b0 = sc.b[kt];
        const float b1 = sc.granule1 ? sc.b[sc.kb_count + kt] : 0.f;
        const char *stage = smem + (kt % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int part = 0; part < 4; part += FP8_PROMOTE_STEPS) {
            eng.issue(stage, part, FP8_PROMOTE_STEPS);
            wgmma_wait<0>();
            eng.promote(s0, s1, b0, b1);
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    eng.stage_out((float *)smem);
    __syncthreads();
}

}  // namespace fmoe

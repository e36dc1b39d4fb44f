// Precision fp8 (FMOE_PREC == 4) on sm_90a: E4M3 × E4M3 warpgroup MMA with per-K-block scale promotion.
// The arithmetic is docs/fp8.md's; the CPU oracle (Sources/FlashMoE/Reference/OracleFP8.swift) computes the same.
//
// A tile is 128 rows (tokens) × 128 columns. Each pipeline stage holds one 128-wide K block:
//   A raw:  128 rows × 256 bytes of BF16 activations (x rows for GEMM0, h rows for GEMM1), as cp.async lands them;
//   B:      128 rows × 128 bytes of E4M3 weight codes, in the 128-byte swizzle wgmma reads.
// Per K block: the block quantizes A (two threads per row: amax over the row's finite values, scale = amax / 448
// or 1, codes = satfinite E4M3 of value / scale, both divisions IEEE) into one shared E4M3 A buffer and a scale
// per row, issues 4 m64n128k32 instructions into a temporary accumulator (the first with scale-d = 0), waits, and
// promotes: acc += tmp · (a_scale[row] · b_scale[granule]) (or every FMOE_FP8_PROMOTE_STEPS instructions). B
// scales come per 64-row granule of the packed weight rows (gated: 64 gate rows, then 64 up rows) and K block,
// from the expert's weight block (host layout: FusedDeviceWeights+FP8.swift). 64 + 64 accumulator registers per
// thread.
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
constexpr int FP8_A_RAW_BYTES = BM * 256;           // one K block of BF16 A rows
constexpr int FP8_B_BYTES = FP8_BN * ROW_BYTES;     // one K block of E4M3 B rows
constexpr int FP8_STAGE_BYTES = FP8_A_RAW_BYTES + FP8_B_BYTES;
constexpr int FP8_A_BYTES = BM * ROW_BYTES;         // the quantized A block (one buffer, not per stage)
constexpr int fp8_smem_bytes(int stages) { return stages * FP8_STAGE_BYTES + FP8_A_BYTES + BM * 4; }

// Where a thread's rows of one fp8 tile come from: BF16 A rows (k_bytes_a = 2K) and E4M3 B rows (k_bytes_b = K,
// a multiple of 16), plus the B scales of the tile's two 64-row granules ([granule][K block], kb_count apart).
struct Fp8Source {
    const char *a[BM / 32];
    const char *b[FP8_BN / 32];
    bool a_valid[BM / 32];
    bool b_valid[FP8_BN / 32];
    int k_bytes_a;
    int k_bytes_b;
    const float *b_scale;  // granule 0 of the tile at K block 0
    int kb_count;          // K blocks per granule row of scales
    bool granule1;         // whether the tile's second granule exists (else its scale reads as 0)
};

FMOE_DEVICE void fp8_load_stage(char *stage, const Fp8Source &src, int kt) {
    const int chunk = threadIdx.x & 7;
    const u32 base_a = smem_addr(stage), base_b = base_a + FP8_A_RAW_BYTES;
#pragma unroll
    for (int i = 0; i < BM / 32; ++i) {
        const int row = loader_row(i);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = chunk + 8 * h, off = kt * 256 + c * 16;
            const bool v = src.a_valid[i] && off < src.k_bytes_a;
            cp_async16(base_a + row * 256 + c * 16, v ? src.a[i] + off : src.a[i], v);
        }
    }
    const int off = kt * ROW_BYTES + chunk * 16;
    const bool k_in = off < src.k_bytes_b;
#pragma unroll
    for (int i = 0; i < FP8_BN / 32; ++i) {
        const int row = loader_row(i);
        const bool v = src.b_valid[i] && k_in;
        cp_async16(base_b + swizzle(row, chunk), v ? src.b[i] + off : src.b[i], v);
    }
}

// Two E4M3 codes (round to nearest even, saturating to ±448, NaN kept): `hi` in the upper byte.
FMOE_DEVICE unsigned short e4m3x2(float hi, float lo) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Quantizes the raw BF16 A block of a stage into the E4M3 buffer `qa` (128-byte swizzled rows) and one scale per
// row in `sa`. Thread t handles half t & 1 (64 values) of row t >> 1; the partner thread is the neighbouring lane.
FMOE_DEVICE void fp8_quantize_a(const char *stage, char *qa, float *sa) {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
    const uint4 *src = (const uint4 *)(stage + row * 256 + half * 128);
    float m = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const uint4 v = src[c];
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float a = fabsf(__uint_as_float(w[q] << 16)), b = fabsf(__uint_as_float(w[q] & 0xffff0000u));
            if (a <= 3.402823466e38f) m = fmaxf(m, a);  // finite values only: NaN and ±∞ fail the test
            if (b <= 3.402823466e38f) m = fmaxf(m, b);
        }
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    float s = __fdiv_rn(m, 448.f);
    if (!(s > 0.f)) s = 1.f;
    if (half == 0) sa[row] = s;
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // 16 values → one 16-byte chunk of the E4M3 row
        u32 out[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint4 v = src[2 * c + (q >> 1)];
            const u32 w0 = (q & 1) ? v.z : v.x, w1 = (q & 1) ? v.w : v.y;
            // w0 holds elements 2j (low half) and 2j + 1 (high half); w1 the next two.
            const unsigned short lo = e4m3x2(__fdiv_rn(__uint_as_float(w0 & 0xffff0000u), s),
                                             __fdiv_rn(__uint_as_float(w0 << 16), s));
            const unsigned short hi = e4m3x2(__fdiv_rn(__uint_as_float(w1 & 0xffff0000u), s),
                                             __fdiv_rn(__uint_as_float(w1 << 16), s));
            out[q] = (u32)lo | ((u32)hi << 16);
        }
        *(uint4 *)(qa + swizzle(row, half * 4 + c)) = make_uint4(out[0], out[1], out[2], out[3]);
    }
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

    // tmp = the k32 steps [first, first + count) of the K block (the first with scale-d = 0).
    FMOE_DEVICE void issue(const char *qa, const char *stage, int first, int count) {
        const int wg = threadIdx.x >> 7;
        const u32 a = smem_addr(qa) + wg * 64 * ROW_BYTES;
        const u32 b = smem_addr(stage) + FP8_A_RAW_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = first; ks < first + count; ++ks)
            wgmma_m64n128k32_e4m3(tmp, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), ks - first);
        wgmma_commit();
    }

    // acc += tmp · a_scale[row] · b_scale[granule]; the m64nN layout is WgmmaEngine's (wgmma.cuh).
    FMOE_DEVICE void promote(const float *sa, float b0, float b1) {
        const int wg = threadIdx.x >> 7, w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
        const int row = wg * 64 + w * 16 + (lane >> 2);
        const float s0 = sa[row], s1 = sa[row + 8];
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

// The fp8 mainloop: loads run STAGES − 1 K blocks ahead; each K block is quantized, multiplied and promoted before
// the next (the promotion needs the block's MMA complete). Leaves the FP32 tile in shared memory like gemm_tile.
template <int STAGES> FMOE_DEVICE void gemm_tile_fp8(char *smem, const Fp8Source &src) {
    static_assert(STAGES >= 2, "the fp8 pipeline needs at least 2 stages");
    constexpr int P = STAGES - 1;
    char *qa = smem + STAGES * FP8_STAGE_BYTES;
    float *sa = (float *)(qa + FP8_A_BYTES);
    Fp8WgmmaEngine eng;
    eng.zero();
    const int ktiles = (src.k_bytes_b + ROW_BYTES - 1) / ROW_BYTES;
#pragma unroll
    for (int s = 0; s < P; ++s) {
        if (s < ktiles) fp8_load_stage(smem + s * FP8_STAGE_BYTES, src, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        char *stage = smem + (kt % STAGES) * FP8_STAGE_BYTES;
        cp_async_wait<P - 1>();
        __syncthreads();  // stage kt landed for everyone
        fp8_quantize_a(stage, qa, sa);
        const float b0 = src.b_scale[kt];
        const float b1 = src.granule1 ? src.b_scale[src.kb_count + kt] : 0.f;
        fence_proxy_async();
        __syncthreads();  // the quantized block and its scales are visible to both warpgroups (and wgmma)
#pragma unroll
        for (int part = 0; part < 4; part += FP8_PROMOTE_STEPS) {
            eng.issue(qa, stage, part, FP8_PROMOTE_STEPS);
            wgmma_wait<0>();
            eng.promote(sa, b0, b1);
        }
        __syncthreads();  // both warpgroups are done with qa, sa and stage kt
        const int next = kt + P;
        if (next < ktiles) fp8_load_stage(smem + (next % STAGES) * FP8_STAGE_BYTES, src, next);
        cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();
    eng.stage_out((float *)smem);
    __syncthreads();
}

}  // namespace fmoe

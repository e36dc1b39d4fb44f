// Precision fp8 (FMOE_PREC == 4), what both of its tensor-core engines share (wgmma_fp8.cuh on sm_90a, mma_fp8.cuh
// on sm_89 and plain sm_90): the E4M3 conversion, the quantization of one activation group, and a tile's scales.
// The arithmetic is docs/fp8.md's; the CPU oracle (Sources/FlashMoE/Reference/OracleFP8.swift) computes the same.
#pragma once
#include "common.cuh"

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

// A code's quotient v / s by the scale's reciprocal, for a value v of a group whose largest finite |v| is mx (so
// |v| ≤ mx, or v is ±∞ or NaN), its scale s = RN(mx / 448) where mx is 0 (s = 1) or at least 2^-96
// (scale_reciprocal_ok), and rs = RN(1 / s) (__frcp_rn): q0 = RN(v · rs), its remainder v − s · q0 (exact in an
// FMA), then q0 + remainder · rs rounded once; q0 itself where the remainder is 0 (which keeps a zero's sign) or NaN
// (v = ±∞ or NaN: q0 is then the quotient). Each value's E4M3 code is the one the IEEE quotient gives: checked on an
// H100 for every such scale and BF16 value (Benchmarks/engine/fp8_division_test.cu). Unlike __fdiv_rn it has no
// per-quotient range check and branch, and no slow path for zeros (rows past an expert's; activation.cuh says the
// same of SiLU's division). Callers take it where a whole warp's scales allow it.
FMOE_DEVICE bool scale_reciprocal_ok(float mx) { return mx == 0.f || mx >= 0x1p-96f; }
FMOE_DEVICE float div_by_scale(float v, float s, float rs) {
    const float q = __fmul_rn(v, rs);
    const float r = fmaf(-s, q, v);
    return r == 0.f || r != r ? q : fmaf(r, rs, q);
}

// One warp quantizes one group of n ≤ 128 consecutive BF16 values (n a multiple of 4; lane l holds values 4l … 4l
// + 3): scale = (largest finite |v|) / 448, or 1 when that is not positive; code = E4M3(v / scale), both divisions
// IEEE round-to-nearest (docs/fp8.md, Scales; the codes' quotients by div_by_scale where it gives the same codes).
// `v` is the lane's 4 values (zeros past n, which leave the amax as it is); returns the lane's 4 codes (value 4l in
// the low byte) and sets `scale` on every lane.
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
    unsigned short lo, hi;
    if (scale_reciprocal_ok(m)) {  // warp-uniform: m is the warp's
        const float rs = __frcp_rn(s);
        lo = e4m3x2(div_by_scale(v[1], s, rs), div_by_scale(v[0], s, rs));
        hi = e4m3x2(div_by_scale(v[3], s, rs), div_by_scale(v[2], s, rs));
    } else {
        lo = e4m3x2(__fdiv_rn(v[1], s), __fdiv_rn(v[0], s));
        hi = e4m3x2(__fdiv_rn(v[3], s), __fdiv_rn(v[2], s));
    }
    return (u32)lo | ((u32)hi << 16);
}

// 4 BF16 values (8 bytes, as loaded) as FP32.
FMOE_DEVICE void bf16x4_f32(uint2 w, float v[4]) {
    v[0] = __uint_as_float(w.x << 16);
    v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16);
    v[3] = __uint_as_float(w.y & 0xffff0000u);
}

// The 4 BF16 values at `src` (8 bytes) as FP32.
FMOE_DEVICE void load_bf16x4(const void *src, float v[4]) { bf16x4_f32(*(const uint2 *)src, v); }

// The scales of one fp8 tile: A scales ([K block] per row; null for a row past the tile's rows: scale 0) and the B
// scales of the tile's two 64-row granules ([granule][K block], kb_count apart). a0 and a1 are this thread's rows'
// A scales: for the wgmma engine its two accumulator rows, for the mma.sync engine (a0 only) row threadIdx.x of
// the tile (threads 0 … 127). The A scales are written in this launch (phase_fp8.cuh): plain loads, never the
// read-only cache.
struct Fp8Scales {
    const float *a0, *a1;
    const float *b;       // granule 0 of the tile at K block 0
    int kb_count;         // K blocks per granule row of scales
    bool granule1;        // whether the tile's second granule exists (else its scale reads as 0)
};

}  // namespace fmoe

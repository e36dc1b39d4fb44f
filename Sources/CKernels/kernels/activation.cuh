// The FFN's activation (FMOE_ACT, which the host defines: 0 ReLU, 1 GELU, 2 GELU's tanh form, 3 SiLU), and SiLU's
// quotient without the IEEE division's per-quotient branch (activation_fast), for the epilogues that form many of
// them at once (tma_fp8_epilogues.cuh, expert_tiles.cuh's gemm0_store). Its own header, so the exhaustive check
// Benchmarks/engine/fp8_division_test.cu runs these very functions.
#pragma once
#include "common.cuh"

namespace fmoe {

FMOE_DEVICE float activation(float v) {
#if FMOE_ACT == 0
    return v > 0.f ? v : (v != v ? v : 0.f);
#elif FMOE_ACT == 1
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
#elif FMOE_ACT == 2
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
#else
    return v / (1.f + expf(-v));
#endif
}

// Whether activation_fast gives activation's bits for every argument added: each finite, at least −64, and 0 or at
// least 2^-90 in magnitude, judged on the FP32 bits as three running extremes, so a warp checks its 64 gate values
// without a branch an argument (short-circuit tests branched an argument; a bitwise AND of float compares made ptxas
// spill the 256-row fp8 kernel, 8 B, NVRTC 13.0).
struct SiluFastRange {
    u32 max_abs = 0, max_negative = 0, min_nonzero = 0xffffffffu;
    FMOE_DEVICE void add(float v) {
        const u32 b = __float_as_uint(v), a = b & 0x7fffffffu;
        max_abs = max(max_abs, a);                           // ±∞ and NaN: 0x7f800000 and above
        max_negative = max(max_negative, b >> 31 ? a : 0u);  // −64: 0x42800000
        min_nonzero = min(min_nonzero, a != 0 ? a : 0xffffffffu);  // 2^-90: 0x12800000
    }
    FMOE_DEVICE bool ok() const {
        return FMOE_ACT != 3 || (max_abs < 0x7f800000u && max_negative <= 0x42800000u && min_nonzero >= 0x12800000u);
    }
};
FMOE_DEVICE bool activation_fast_ok(float v) {
    SiluFastRange r;
    r.add(v);
    return r.ok();
}

// SiLU's IEEE division ends in a range check and a branch to a slow path per quotient (FCHK, then a call), so each
// quotient is its own branch region, and on zero arguments (rows past the expert's, where accumulators stay 0) it
// appears to take the slow path (Benchmarks/RESULTS.md "Round 37"). For arguments where activation_fast_ok holds,
// activation_fast computes the division's own fast path (an approximate reciprocal, one Newton step, the quotient and
// one remainder correction: the arithmetic __fdiv_rn runs when its range check passes) without the check, and
// returns a zero argument as it is (0 / 2 keeps the sign): the same bits as activation for every FP32 argument in
// the range, checked exhaustively on an H100 (Benchmarks/engine/fp8_division_test.cu). The range keeps the divisor
// 1 + e^-v finite and below 2^93 and the remainder a normal number. Callers decide per warp (__all_sync), so the
// fast code has no branch.
FMOE_DEVICE float activation_fast(float v) {
#if FMOE_ACT == 3
    const float d = 1.f + expf(-v);
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d));
    y = fmaf(y, fmaf(-d, y, 1.f), y);
    const float q = __fmul_rn(v, y);
    const float r = fmaf(-d, q, v);
    return v == 0.f ? v : fmaf(y, r, q);
#else
    return activation(v);
#endif
}

}  // namespace fmoe

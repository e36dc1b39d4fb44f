// Decode gate: the router GEMM of a launch of a few tokens as one dot-product task per router row, instead of
// 128-token tensor-core tiles that are almost all zero rows. See phase_gate.cuh.
//
// At S = 1 the tile gate (16 tasks, a K slice each) took 6–10 µs of qwen3-30b-a3b's 25–29 µs before the first
// expert task (H200 traces, 2026-12-02): a tile pipeline's start-up for a 1 × 2048 × 128 product. Here task n is
// router row n (EG tasks, about one a block): the block's 8 warps each take an eighth of K, a lane loads 16 bytes
// of the row and of every token's x at the same K offset, all in flight at once, so the task is one round trip to
// memory and two reductions. The sums have one fixed order (a lane's 8 products in K order, its chunks in order,
// the warp's butterfly, then the 8 warps' partials in warp order): the same bits every run, and a token's logits
// do not depend on which block, launch or rank computes them.
//
// The host asks for it with Params::gate_ksplit = 0, chosen like the K split from the global token count
// (FusedKernel.gateSplit), so ranks take the same path as one rank and keep its bits. Only for 16-bit router
// weights (bf16, fp16, and fp8 whose router is bf16), whose products are exact in FP32: the tf32 and fp32 gates
// keep their tiles' rounding.
#pragma once
#include "moe_params.cuh"

namespace fmoe {

// FMOE_GATE_GEMV: 1 (default) when the host asks, 0 never (A/B runs).
#ifndef FMOE_GATE_GEMV
#define FMOE_GATE_GEMV 1
#endif
constexpr int GATE_GEMV_TOKENS = 8;  // the most tokens a launch may have for the host to ask
constexpr bool GATE_GEMV_ON = FMOE_GATE_GEMV != 0 && FMOE_PREC >= 2 && H % 8 == 0;
constexpr int GATE_GEMV_CHUNKS = H / 8;                         // 16-byte chunks of a row
constexpr int GATE_GEMV_WARP_CHUNKS = (GATE_GEMV_CHUNKS + 7) / 8;  // a warp's share of them

// Whether this launch computes its gate with gate_gemv_task (block-uniform).
FMOE_DEVICE bool gate_gemv(const Params &p) {
    return GATE_GEMV_ON && p.gate_ksplit == 0 && p.tokens <= GATE_GEMV_TOKENS;
}

#if FMOE_PREC >= 2
// acc + the 8 products of two chunks of 8 16-bit values, in element order.
FMOE_DEVICE float dot8(const uint4 &a, const uint4 &b, float acc) {
    const u32 av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        T alo, ahi, blo, bhi;
        alo.bits = (unsigned short)(av[i] & 0xffffu); ahi.bits = (unsigned short)(av[i] >> 16);
        blo.bits = (unsigned short)(bv[i] & 0xffffu); bhi.bits = (unsigned short)(bv[i] >> 16);
        acc = fmaf(Storage<T>::load(alo), Storage<T>::load(blo), acc);
        acc = fmaf(Storage<T>::load(ahi), Storage<T>::load(bhi), acc);
    }
    return acc;
}

// Router row n's logit for every token of the launch, into p.logits ([S][EG]; the caller releases and counts it).
// `smem` holds the warps' partial sums. Every thread of the block calls it.
FMOE_DEVICE void gate_gemv_task(const Params &p, int n, char *smem) {
    float *part = (float *)smem;  // [warp][token]
    const int warp = FMOE_TID >> 5, lane = FMOE_TID & 31, S = p.tokens;
    const uint4 *w = (const uint4 *)(p.wg + (size_t)n * H);
    float acc[GATE_GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GATE_GEMV_TOKENS; ++t) acc[t] = 0.f;
    const int c1 = min((warp + 1) * GATE_GEMV_WARP_CHUNKS, GATE_GEMV_CHUNKS);
    for (int c = warp * GATE_GEMV_WARP_CHUNKS + lane; c < c1; c += 32) {
        // The row's chunk and every token's, issued together: one round trip.
        const uint4 wv = *(const uint4 *)&w[c];
        uint4 xv[GATE_GEMV_TOKENS];
#pragma unroll
        for (int t = 0; t < GATE_GEMV_TOKENS; ++t) {
            xv[t] = t < S ? ((const uint4 *)(p.x + (size_t)t * H))[c] : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int t = 0; t < GATE_GEMV_TOKENS; ++t) acc[t] = dot8(wv, xv[t], acc[t]);
    }
#pragma unroll
    for (int t = 0; t < GATE_GEMV_TOKENS; ++t) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(~0u, acc[t], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < GATE_GEMV_TOKENS; ++t) part[warp * GATE_GEMV_TOKENS + t] = acc[t];
    }
    sync_block();
    if (FMOE_TID < S) {
        float sum = 0.f;
        for (int q = 0; q < THREADS / 32; ++q) sum += part[q * GATE_GEMV_TOKENS + FMOE_TID];  // warp order
        p.logits[(size_t)FMOE_TID * EG + n] = sum;
    }
}
#else
FMOE_DEVICE void gate_gemv_task(const Params &, int, char *) {}  // 32-bit types keep the tile gate
#endif

}  // namespace fmoe

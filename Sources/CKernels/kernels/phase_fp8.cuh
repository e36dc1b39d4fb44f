// Precision fp8: the activations' E4M3 codes and scales, and the routed experts' fp8 tiles (docs/fp8.md). x is
// quantized once per launch, per token and 128-channel group, before the grid barrier; h per 128-channel group of
// a row block (whole row blocks at decode and for GEMV experts), by the block whose GEMM0 tile completes it, before
// the row block is published to GEMM1 (phase_experts.cuh, count_gemm0_tile_fp8). The mainloop (wgmma_fp8.cuh)
// reads codes only: quantizing in the mainloop repeated each row's divisions for every column tile of the GEMM.
// See moe.cu.
#pragma once
#include "moe_params.cuh"

namespace fmoe {

#if FMOE_PREC == 4
constexpr int WARPS = THREADS / 32;

// Groups a warp has in flight in quantize_groups: it loads U groups, then reduces and stores each, so the loads'
// latencies overlap. With one group at a time (round 22's loop) every group was a dependent L2 round trip: the block
// completing a row block of h took 57 µs (qwen3-30b-a3b, I = 768), 320 µs (paper-e64) and 1.38 ms (mixtral-8x7b,
// I = 14,336: 1,792 groups a warp) while GEMM1 waited for that row block, and x's took about 160 µs before the
// placement at qwen3-30b-a3b S = 16384. 8 gives the same bits and prefill 2 – 8 % faster on the cp.async engine,
// 2 – 24 % on the TMA engine (mixtral-8x7b S = 4096 5.19 → 4.84 and 6.05 → 4.60 ms); 16 measures as 8 does
// (round 24, Benchmarks/RESULTS.md). The mma.sync engine (sm_89) keeps the one-group loop: with 8 its plain and
// traced fp8 kernels spill (FusedKernelTests), and with 1 it stays the kernel verified on the H200 as emulated sm_89.
#ifndef FMOE_QUANT_GROUPS
#define FMOE_QUANT_GROUPS (FMOE_WGMMA ? 8 : 1)
#endif

// 1: x's quantization (quantize_x_fp8) loads the next U groups of a warp before it reduces and stores the current
// U, so a warp's loads overlap its arithmetic as well as each other (x's E4M3 codes took about 100 µs at
// qwen3-30b-a3b S = 16384, the 25 µs its bytes need at the copy rate: Benchmarks/RESULTS.md, round 31). Same bits:
// every group is quantized by the same warp's lanes from the same values. 0 (the default until it is timed; it
// compiles without spills at the fp8 presets): round 24's batches, each loaded and then quantized.
#ifndef FMOE_QUANT_PIPE
#define FMOE_QUANT_PIPE 0
#endif

// Quantizes groups first, first + step, … (below `groups`) of BF16 values `src` (row stride COLS, KB = ⌈COLS/128⌉
// groups a row) into codes `dst` (same indexing, bytes) and scales `scale` ([row][KB]); group g is row g / KBS,
// K block kb0 + g % KBS: every group of each row (KBS = KB, kb0 = 0), or K block kb0 of each row (KBS = 1). One warp
// per group; COLS is a multiple of 16 (the host checks H and I), so a lane holds 4 values or none.
// PIPE: the next batch's loads are issued before this batch is quantized (FMOE_QUANT_PIPE).
template <int COLS, int KBS = (COLS + FP8_GROUP - 1) / FP8_GROUP, bool PIPE = false>
FMOE_DEVICE void quantize_groups(const bf16_t *src, unsigned char *dst, float *scale, int groups, int first,
                                 int step, int kb0 = 0) {
    constexpr int KB = (COLS + FP8_GROUP - 1) / FP8_GROUP, U = FMOE_QUANT_GROUPS;
    const int lane = FMOE_TID & 31;
#if FMOE_QUANT_GROUPS == 1
    // One group at a time, round 22's loop as it was (the general loop at U = 1 compiles to other code).
    for (int g = first; g < groups; g += step) {
        const int row = g / KBS, kb = kb0 + g % KBS;
        const int c = kb * FP8_GROUP + 4 * lane;
        const bool in = c < COLS;
        const size_t at = (size_t)row * COLS + c;
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        if (in) load_bf16x4(src + at, v);
        float s;
        const u32 codes = quantize_group4(v, s);
        if (in) *(u32 *)(dst + at) = codes;
        if (lane == 0) scale[(size_t)row * KB + kb] = s;
    }
#else
    // The loads of U groups from g0 (raw: 2 registers a group), issued together so their latencies overlap.
    auto load = [&](int g0, uint2 (&raw)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int g = g0 + u * step, c = (kb0 + g % KBS) * FP8_GROUP + 4 * lane;
            raw[u] = make_uint2(0u, 0u);
            if (g < groups && c < COLS) raw[u] = *(const uint2 *)(src + (size_t)(g / KBS) * COLS + c);
        }
    };
    // The U groups from g0, quantized and stored.
    auto store = [&](int g0, const uint2 (&raw)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int g = g0 + u * step;
            if (g >= groups) break;  // warp-uniform: quantize_group4 reduces across the warp
            const int row = g / KBS, kb = kb0 + g % KBS;
            const int c = kb * FP8_GROUP + 4 * lane;
            float v[4];
            bf16x4_f32(raw[u], v);
            float s;
            const u32 codes = quantize_group4(v, s);
            if (c < COLS) *(u32 *)(dst + (size_t)row * COLS + c) = codes;
            if (lane == 0) scale[(size_t)row * KB + kb] = s;
        }
    };
    if constexpr (PIPE) {
        uint2 raw[U], next[U];
        if (first < groups) load(first, raw);
        for (int g0 = first; g0 < groups; g0 += U * step) {
            // The next batch is in flight while this one is reduced and stored (4 registers a group in all).
            load(g0 + U * step, next);
            store(g0, raw);
#pragma unroll
            for (int u = 0; u < U; ++u) raw[u] = next[u];
        }
    } else {
        for (int g0 = first; g0 < groups; g0 += U * step) {
            uint2 raw[U];
            load(g0, raw);
            store(g0, raw);
        }
    }
#endif
}

// Every token's x as E4M3 codes and scales (p.xq, p.xq_scale), the warps of `workers` blocks (the grid, or the
// decode prefix's one block) striding over the groups. GEMM0 reads them after the grid barrier (decode prefix:
// after acquiring the scan flag), which orders these writes before it.
FMOE_DEVICE void quantize_x_fp8(const Params &p, int worker, int workers) {
    const int warp = worker * WARPS + (int)(FMOE_TID >> 5);
    quantize_groups<H, KB_H, FMOE_QUANT_PIPE != 0>(p.x, p.xq, p.xq_scale, p.tokens * KB_H, warp, workers * WARPS);
}

// Rows m·BM … of routed expert x's h as E4M3 codes and scales (p.hq, p.hq_scale), by the whole block: every group
// of each row (KBS = KB_I), or group kb0 (channels 128·kb0 …) of each row (KBS = 1), the same values and bits either
// way. The caller acquired the GEMM0 tiles that wrote them (last_arrival; count_gemm0_tile_fp8, phase_experts.cuh)
// and releases the codes before the row block is published.
template <int KBS = KB_I>
FMOE_DEVICE void quantize_h_fp8(const Params &p, const Layout &L, int x, int m, int kb0 = 0) {
    const int first = m * BM, n = min(BM, rows_of(L, x) - first);
    const size_t row0 = (size_t)L.row_start[x] + first;
    quantize_groups<I, KBS>(p.hbuf + row0 * I, p.hq + row0 * I, p.hq_scale + row0 * KB_I, n * KBS,
                            (int)(FMOE_TID >> 5), WARPS, kb0);
}

// A routed expert's fp8 tile: A from E4M3 rows (`src.a`, K = kdim bytes each, scales `sc.a0`/`sc.a1` set by the
// caller), B from weight tile n of expert x's image in `w` (image_bytes each, layout in moe_params.cuh): rows
// n·128… of its codes ([rows, kdim] bytes) and their granule scales ([granules][kb]).
FMOE_DEVICE void expert_tile_fp8(char *smem, TileSource &src, Fp8Scales &sc, const void *w, int x,
                                 size_t image_bytes, size_t code_bytes, int n, int rows, int granules, int kdim,
                                 int kb) {
    const unsigned char *codes = (const unsigned char *)w + (size_t)x * image_bytes;
    const float *scales = (const float *)(codes + code_bytes);
    point_rows<FP8_BN>(src.b, src.b_valid, codes, n * FP8_BN, rows, (size_t)kdim);
    src.k_bytes = kdim;
    sc.b = scales + (size_t)(2 * n) * kb;
    sc.kb_count = kb;
    sc.granule1 = 2 * n + 1 < granules;
#if FMOE_WGMMA
    gemm_tile_fp8<STAGES>(smem, src, sc);
#else
    gemm_tile_fp8_mma<STAGES>(smem, src, sc);
#endif
}

// This thread's tile row whose A scales it passes to the engine (Fp8Scales): the wgmma engine's first accumulator
// row (its second is 8 further), the mma.sync engine's row threadIdx.x (threads 0 … 127; a1 unused).
FMOE_DEVICE int fp8_scale_row() {
#if FMOE_WGMMA
    return wgmma_acc_row();  // wgmma.cuh
#else
    return FMOE_TID < BM ? (int)FMOE_TID : 1 << 30;  // threads 128 …: a row past any tile's (a0 = null)
#endif
}

// GEMM0 tile (m, n) of routed expert x: its rows' tokens' x codes and scales, or with ranks the rows this owner
// received (received_codes, moe_params.cuh). The one-GPU form is written out apart so its code stays round 45's.
FMOE_DEVICE void gemm0_tile_fp8(const Params &p, const Layout &L, int x, int rows, int m, int n, char *smem) {
    const int first = m * BM, base = L.row_start[x] + first;
    TileSource src;
    Fp8Scales sc;
    if (RANKS > 1) {
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const int r = loader_row(i);
            src.a_valid[i] = first + r < rows;
            src.a[i] = (const char *)received_codes(p, base + (src.a_valid[i] ? r : 0));
        }
        const int r0 = fp8_scale_row();
        sc.a0 = first + r0 < rows ? received_scales(p, base + r0) : nullptr;
        sc.a1 = FMOE_WGMMA && first + r0 + 8 < rows ? received_scales(p, base + r0 + 8) : nullptr;
    } else {
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const int r = loader_row(i);
            src.a_valid[i] = first + r < rows;
            src.a[i] = (const char *)(p.xq + (size_t)(src.a_valid[i] ? p.row_token[base + r] : 0) * H);
        }
        const int r0 = fp8_scale_row();
        sc.a0 = first + r0 < rows ? p.xq_scale + (size_t)p.row_token[base + r0] * KB_H : nullptr;
        sc.a1 = FMOE_WGMMA && first + r0 + 8 < rows ? p.xq_scale + (size_t)p.row_token[base + r0 + 8] * KB_H
                                                      : nullptr;
    }
    expert_tile_fp8(smem, src, sc, p.w1, x, W1_EXPERT_BYTES, W1_CODES, n, N0, G0, H, KB_H);
}

// GEMM1 tile (m, n) of routed expert x: its rows' h codes and scales.
FMOE_DEVICE void gemm1_tile_fp8(const Params &p, const Layout &L, int x, int rows, int m, int n, char *smem) {
    const int first = m * BM;
    const size_t base = (size_t)L.row_start[x] + first;
    TileSource src;
    Fp8Scales sc;
    point_rows<BM>(src.a, src.a_valid, p.hq + base * I, 0, rows - first, (size_t)I);
    const int r0 = fp8_scale_row();
    sc.a0 = first + r0 < rows ? p.hq_scale + (base + r0) * KB_I : nullptr;
    sc.a1 = FMOE_WGMMA && first + r0 + 8 < rows ? p.hq_scale + (base + r0 + 8) * KB_I : nullptr;
    expert_tile_fp8(smem, src, sc, p.w2, x, W2_EXPERT_BYTES, W2_CODES, n, H, G1, I, KB_I);
}
#endif

}  // namespace fmoe

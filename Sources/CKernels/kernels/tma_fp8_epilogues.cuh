// The fp8 TMA engine's GEMM0 epilogues (FMOE_TMA builds of FMOE_PREC 4): h from a routed tile's accumulators, as
// BF16 rows (gemm0_store_acc_fp8, for the per-group pass of phase_experts.cuh) or, with h from the accumulators
// (FMOE_H_FROM_ACC, tma_fp8_tasks.cuh), straight to E4M3 codes and scales: a 128-row ticket's group of column tiles
// through hbuf (gemm0_group_fp8), a 256-row tile's groups from its registers (gemm0_quantize_acc_fp8). Either way a
// row's 128-channel group is quantized as quantize_group4 (fp8.cuh) quantizes it from hbuf, so the bits are the same.
#pragma once

#if FMOE_TMA && FMOE_PREC == 4
#include "tma_fp8_tasks.cuh"

namespace fmoe {

// The h pair of accumulator registers c, c + 1 of a routed GEMM0 tile (128-row half h's registers 64h …, together the
// m64nBN layout) at output column col: the packed weight rows are blocks of 64 gate rows and their 64 up rows
// (FusedDeviceWeights+FP8.swift), so output column (BN/2)·q + 8j + … is half j / 8's gate register 4j + c (+ 32 for
// j ≥ 8) and its up register 32 further. Gated: act(gate) · up; plain: act(acc + b1). gemm0_store's arithmetic, so
// the bits of the cp.async tile.
// FAST (gated only): activation_fast, where the caller found activation_fast_ok for the warp's gate registers.
template <bool FAST = false> FMOE_DEVICE u32 gemm0_pair_fp8(const Params &p, int x, const float *acc, int c, int col) {
    if (GATED) {
        const int g = c < 32 ? c : c + 32;
        if (FAST) return pack_t2(activation_fast(acc[g]) * acc[g + 32], activation_fast(acc[g + 1]) * acc[g + 33]);
        return pack_t2(activation(acc[g]) * acc[g + 32], activation(acc[g + 1]) * acc[g + 33]);
    }
    const bool bias = p.b1 != nullptr && col < I;
    return pack_t2(activation(acc[c] + (bias ? p.b1[(size_t)x * I + col] : 0.f)),
                   activation(acc[c + 1] + (bias ? p.b1[(size_t)x * I + col + 1] : 0.f)));
}
// GEMM0's epilogue of routed ticket (x, m, q) as BF16 rows of hbuf (FMOE_H_FROM_ACC 0), for the per-group pass.
FMOE_DEVICE void gemm0_store_acc_fp8(const Params &p, const Layout &L, int x, int m, int q, const float *acc) {
    constexpr int OUT_COLS = GATED ? FMOE_TMA_FP8_BN / 2 : FMOE_TMA_FP8_BN;
    store_acc_pairs<OUT_COLS>(h_rows(p, L, x), I, I, rows_of(L, x), m * BM, q * OUT_COLS,
                              [&](int c, int col) { return gemm0_pair_fp8(p, x, acc, c, col); });
}

// Where lane `tid`'s pair pj of row half h of column tile n of routed expert x's row block m is held in hbuf (its
// BF16 position: wgmma_acc_row / wgmma_acc_col's row and columns), or null for a row past the expert's or a column
// past I.
FMOE_DEVICE u32 *held_pair(const Params &p, const Layout &L, int x, int m, int n, int h, int pj, int tid) {
    const int r = m * BM + wgmma_acc_row(tid) + 8 * h;
    const int col = n * H_TILE_COLS + 8 * pj + 2 * (tid & 3);
    return r < rows_of(L, x) && col < I ? (u32 *)(p.hbuf + ((size_t)L.row_start[x] + r) * I + col) : nullptr;
}

// Quantizes one 128-channel group g of h in the rows of routed expert x's row block m this thread's accumulators
// hold (wgmma_acc_row: r0 and r0 + 8): hv[h][i] is the packed BF16 pair i of row half h — the group's columns
// 8i + 2t, +1 (t = the lane in its quad; wgmma_acc_col), 0 past I — so a row's 128 values are its quad's. Each row as
// quantize_group4 (fp8.cuh) quantizes it from hbuf: the largest finite |v| over the quad (two shuffles), scale = that
// / 448 (1 when not positive), codes E4M3(v / scale) (div_by_scale where the whole warp's scales allow it, else IEEE
// divisions: the same codes). A quad transposes its code pairs (quad_transpose) so a lane stores 8 contiguous bytes.
// Rows past the expert's store nothing. GEMM1 reads the codes by TMA: the caller fences them to the async proxy and
// releases them.
// A split tile's warpgroup (FMOE_FP8_SPLIT_HALVES) holds N = 8 of a row's 16 pairs, the group's column blocks jb0,
// jb0 + 1 (of 4), and passes its thread index mod 128; `scale_writer` says whether it stores the rows' scales.
template <bool FAST, int N = 16>
FMOE_DEVICE void store_codes_fp8(const Params &p, const Layout &L, int x, int m, int g, const u32 (&hv)[2][N],
                                 const float (&s)[2], int tid, int jb0 = 0, bool scale_writer = true) {
    const int rows = rows_of(L, x), first = m * BM, t = tid & 3;
    const int r0 = wgmma_acc_row(tid);
    const size_t base = (size_t)L.row_start[x] + first;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float rs = FAST ? __frcp_rn(s[h]) : 0.f;
        const int r = r0 + 8 * h;
        const bool ok = first + r < rows;
        unsigned char *row = p.hq + (base + (ok ? r : 0)) * I + (size_t)g * FP8_GROUP;
#pragma unroll
        for (int jl = 0; jl < N / 4; ++jl) {
            const int jb = jb0 + jl;
            u32 w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float hi = __uint_as_float(hv[h][4 * jl + i] & 0xffff0000u);
                const float lo = __uint_as_float(hv[h][4 * jl + i] << 16);
                w[i] = FAST ? e4m3x2(div_by_scale(hi, s[h], rs), div_by_scale(lo, s[h], rs))
                            : e4m3x2(__fdiv_rn(hi, s[h]), __fdiv_rn(lo, s[h]));
            }
            const uint4 o = quad_transpose(w, t);  // code pairs of columns 8(4jb + t) + 2i
            const int col = 8 * (4 * jb + t);
            if (ok && (I % FP8_GROUP == 0 || g * FP8_GROUP + col < I))
                *(uint2 *)(row + col) = make_uint2(o.x | (o.y << 16), o.z | (o.w << 16));
        }
        if (ok && t == 0 && scale_writer) p.hq_scale[(base + r) * KB_I + g] = s[h];
    }
}
// The largest finite |v| of a row's values this thread's quad holds: N packed BF16 pairs a lane, two shuffles. Finite
// values only, as quantize_group4; fmaxf in any order gives the same value.
template <int N> FMOE_DEVICE float quad_amax(const u32 (&v)[N]) {
    float mx = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float a = fabsf(__uint_as_float(v[i] << 16)), b = fabsf(__uint_as_float(v[i] & 0xffff0000u));
        if (a <= 3.402823466e38f) mx = fmaxf(mx, a);
        if (b <= 3.402823466e38f) mx = fmaxf(mx, b);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
}
// A row's scale from its amax, as quantize_group4: amax / 448, 1 where that is not positive.
FMOE_DEVICE float group_scale(float mx) {
    const float s = __fdiv_rn(mx, 448.f);
    return s > 0.f ? s : 1.f;
}
FMOE_DEVICE void quantize_pairs_fp8(const Params &p, const Layout &L, int x, int m, int g, const u32 (&hv)[2][16],
                                    int tid) {
    float s[2];
    bool fast = true;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float mx = quad_amax(hv[h]);
        s[h] = group_scale(mx);
        fast &= scale_reciprocal_ok(mx);
    }
    if (__all_sync(0xffffffffu, fast)) store_codes_fp8<true>(p, L, x, m, g, hv, s, tid);
    else store_codes_fp8<false>(p, L, x, m, g, hv, s, tid);
}

// Routed GEMM0 ticket q of expert x's row block m with 128-row tiles (GROUP_TICKETS): group q of h, its column tiles
// run back to back on this block. Each tile's epilogue values (gemm0_pair_fp8: hbuf's BF16 pairs) go to their hbuf
// positions and each thread reads back only what it wrote — held in registers across the next tile's mainloop they
// made ptxas spill the consumers' loop (deepseek-v3: 16 B) — then quantize_pairs_fp8.
FMOE_DEVICE void gemm0_group_fp8(const Params &p, const Layout &L, const TmaMaps &maps, ExpertTmaFp8 &eng, int x,
                                 int m, int q) {
    constexpr int PJ = H_TILE_COLS / 8;  // pairs a tile gives a row
    static_assert(!GROUP_TICKETS || QT * PJ == 16, "a group is 16 pairs a row");
    const int n0 = QT * q, tiles = min(QT, NT0 - n0);
    // One mainloop in the code (a loop, not unrolled): each tile's pairs go to their hbuf positions.
    for (int j = 0; j < tiles; ++j) {
        float acc[ExpertTmaFp8::ACC];
        eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM0, x, m, n0 + j),
                    tma_scales_fp8(p, L, TASK_GEMM0, x, m, n0 + j), acc);
        const int tid = fresh_tid();
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int pj = 0; pj < PJ; ++pj) {
                u32 *at = held_pair(p, L, x, m, n0 + j, h, pj, tid);
                const int col = (n0 + j) * H_TILE_COLS + 8 * pj + 2 * (tid & 3);
                if (at != nullptr) *at = gemm0_pair_fp8(p, x, acc, 4 * pj + 2 * h, col);
            }
    }
    // Read back (this thread's own writes; 0 past I, past the group's tiles and for rows past the expert's).
    const int tid = fresh_tid();
    u32 hv[2][16];  // [row half][pair]
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const u32 *at = i / PJ < tiles ? held_pair(p, L, x, m, n0 + i / PJ, h, i % PJ, tid) : nullptr;
            hv[h][i] = at != nullptr ? *at : 0u;
        }
    quantize_pairs_fp8(p, L, x, m, q, hv, tid);
}

// A row half's N pairs of h from accumulators `acc` (gemm0_pair_fp8's register order, pair i at registers 4i + 2h):
// output columns col0 + 8i + 2t (t = the lane in its quad), 0 past I. Where I is a multiple of the group every column
// is inside: no branch a pair, so ptxas can interleave the pairs' chains.
template <bool FAST, int N>
FMOE_DEVICE void acc_pairs_fp8(const Params &p, int x, const float *acc, int col0, int tid, u32 (&hv)[2][N]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int col = col0 + 8 * i + 2 * (tid & 3);
            hv[h][i] = I % FP8_GROUP == 0 || col < I ? gemm0_pair_fp8<FAST>(p, x, acc, 4 * i + 2 * h, col) : 0u;
        }
}

// Routed GEMM0 ticket q of expert x's row block m with 256-row tiles: the tile's accumulators hold whole groups of h
// (gated: output columns 128q …, group q; plain: 256q …, groups 2q and 2q + 1), so each group's pairs are formed
// from them (gemm0_pair_fp8, the register order of gemm0_store_acc_fp8) and quantized; no BF16 h is written.
template <bool FAST>
FMOE_DEVICE void quantize_acc_groups_fp8(const Params &p, const Layout &L, int x, int m, int q, const float *acc,
                                         int tid) {
    constexpr int GROUPS = GATED ? FMOE_TMA_FP8_BN / 2 / FP8_GROUP : FMOE_TMA_FP8_BN / FP8_GROUP;
#pragma unroll
    for (int gg = 0; gg < GROUPS; ++gg) {
        const int g = GROUPS * q + gg;
        if (g * FP8_GROUP >= I) break;  // block-uniform: a plain FFN's last ticket of one group
        u32 hv[2][16];
        acc_pairs_fp8<FAST>(p, x, acc + 64 * gg, g * FP8_GROUP, tid, hv);  // (gated: one group, gg = 0)
        quantize_pairs_fp8(p, L, x, m, g, hv, tid);
    }
}
// A split tile (FMOE_FP8_SPLIT_HALVES, tma_fp8_engine.cuh): warpgroup wg holds the tile's rows (wgmma_acc_row of the
// thread index mod 128) and half wg of its columns in acc[0 … 64). Plain: that half is group 2q + wg whole. Gated: it
// is channels 64·wg … of group q (gate registers 0 … 31, up 32 further), whose pairs split_pairs_fp8 forms,
// with activation_fast where the warp's gate registers allow it (the same bits either way).
FMOE_DEVICE void split_pairs_fp8(const Params &p, int x, int q, const float *acc, int rt, int wg, u32 (&hv)[2][8]) {
    SiluFastRange range;
#pragma unroll
    for (int c = 0; c < 32; ++c) range.add(acc[c]);
    const int col0 = q * FP8_GROUP + 64 * wg;
    if (__all_sync(0xffffffffu, range.ok())) acc_pairs_fp8<true>(p, x, acc, col0, rt, hv);
    else acc_pairs_fp8<false>(p, x, acc, col0, rt, hv);
}
// The split tiles' row amaxes, [warpgroup][tile row].
FMOE_DEVICE float *split_amax() {
    __shared__ float a[2 * 64];
    return a;
}
// A split tile's GEMM0 epilogue. Gated: a row's amax is the larger of the two warpgroups' (fmaxf: the same value as
// over the whole row), exchanged through shared memory between two barriers of the consumers (the second keeps the
// next split tile's writes after this one's reads), which every consumer thread reaches, warps without rows too;
// each warpgroup stores its own codes, the first the scales. The pairs are formed twice, for the amax before the
// exchange and for the codes after it: held across the barriers they made ptxas spill (deepseek-v3: 128 B, NVRTC 13.0).
FMOE_DEVICE void gemm0_quantize_split_fp8(const Params &p, const Layout &L, int x, int m, int q, const float *acc,
                                          int tid) {
    const int rt = tid & 127, wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    const bool rows_here = m * BM + (rt >> 5) * 16 < rows_of(L, x);  // the warp's first row (its lane 0's)
    if (!GATED) {
        const int g = 2 * q + wg;
        if (!rows_here || g * FP8_GROUP >= I) return;
        u32 hv[2][16];
        acc_pairs_fp8<false>(p, x, acc, g * FP8_GROUP, rt, hv);
        quantize_pairs_fp8(p, L, x, m, g, hv, rt);
        return;
    }
    const int r0 = wgmma_acc_row(rt);
    float mx[2] = {0.f, 0.f};
    if (rows_here) {
        u32 hv[2][8];
        split_pairs_fp8(p, x, q, acc, rt, wg, hv);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = quad_amax(hv[h]);
            if ((rt & 3) == 0) split_amax()[64 * wg + r0 + 8 * h] = mx[h];
        }
    }
    sync_block();
    if (rows_here) {
#pragma unroll
        for (int h = 0; h < 2; ++h) mx[h] = fmaxf(mx[h], split_amax()[64 * (wg ^ 1) + r0 + 8 * h]);
    }
    sync_block();
    if (!rows_here) return;
    u32 hv[2][8];
    split_pairs_fp8(p, x, q, acc, rt, wg, hv);
    float s[2];
    bool fast = true;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        s[h] = group_scale(mx[h]);
        fast &= scale_reciprocal_ok(mx[h]);
    }
    if (__all_sync(0xffffffffu, fast)) store_codes_fp8<true, 8>(p, L, x, m, q, hv, s, rt, 2 * wg, wg == 0);
    else store_codes_fp8<false, 8>(p, L, x, m, q, hv, s, rt, 2 * wg, wg == 0);
}

// A warp whose 16 rows all lie past the expert's stores nothing, so it skips the epilogue, and gated FFNs take
// activation_fast where every gate value of the warp allows it (the same bits either way). Before both, a tile of at
// most 64 rows (an expert's last row block; its second warpgroup computes nothing, tma_fp8_engine.cuh,
// FMOE_FP8_IDLE_WG) ended with that warpgroup's epilogue on zeros (IEEE divisions, slow on zero dividends, it
// appears): 26 µs to the release barrier, where the release then waited 14.5 µs; a full tile's epilogue took
// 9.9 – 10.1 µs. With both, and without a branch a pair or a gate value: 0.6 µs, 1.3 µs and 6.1 µs (deepseek-v3
// S = 4096, H100 traces with per-warpgroup stamps; Benchmarks/RESULTS.md "Round 37").
// A split tile's epilogue: gemm0_quantize_split_fp8.
FMOE_DEVICE void gemm0_quantize_acc_fp8(const Params &p, const Layout &L, int x, int m, int q, const float *acc) {
    const int tid = fresh_tid();
    if (ExpertTmaFp8::split(rows_of(L, x) - m * BM, true)) {
        gemm0_quantize_split_fp8(p, L, x, m, q, acc, tid);
        return;
    }
    if (m * BM + (tid >> 5) * 16 >= rows_of(L, x)) return;  // the warp's first row (wgmma_acc_row of its lane 0)
    bool fast = GATED && FMOE_TMA_FP8_BN == 256;  // (128-row tiles run gemm0_group_fp8 instead)
    if (fast) {
        // The gate registers gemm0_pair_fp8 reads: 0 … 31 and 64 … 95 (their up values are 32 further).
        SiluFastRange range;
#pragma unroll
        for (int c = 0; c < 64; ++c) range.add(acc[c < 32 ? c : c + 32]);
        fast = range.ok();
    }
    if (__all_sync(0xffffffffu, fast)) quantize_acc_groups_fp8<true>(p, L, x, m, q, acc, tid);
    else quantize_acc_groups_fp8<false>(p, L, x, m, q, acc, tid);
}

}  // namespace fmoe
#endif

// Decode GEMV: a routed expert with at most GEMV_TOKENS rows (decode: a token or a few per expert) runs each of its
// GEMM0 and GEMM1 tiles as a weight-streaming GEMV on mma.sync, instead of a 128-row tensor-core tile that is
// almost all zero rows. See moe.cu and decode_tiles.cuh.
//
// The weights are the MMA's A operand (16 weight rows a warp), the expert's ≤ 8 rows its B operand (the n8
// columns), so no zero rows are multiplied and nothing is staged in shared memory: each lane loads 16 bytes of
// weight row g, 16 bytes of row g + 8 and 16 bytes of token row g at the same K offset straight into registers
// and feeds them to two MMAs. A dot product may take its K terms in any order as long as both operands take the
// same one, so the 16 bytes a lane holds stand for the (non-contiguous) K positions that the fragment layout
// assigns to it; the sum is the same set of products, in the MMA's own order.
//
// A tile's weight rows (the same rows and output columns as the tile it replaces, so tickets, counters and
// epilogues are unchanged) are cut into 16-row slabs, and each slab's K into KP parts, so the block's 8 warps all
// stream; the parts' sums meet in shared memory and are added in part order, and the result is staged as the
// tile's [row][column] FP32 block for the tile's own epilogue. Every sum has one fixed order: the same bits every
// run. fp8 (e4m3 m16n8k32) promotes each 128-wide K block with its two scales like the tile engines (fp8.cuh).
//
// The choice depends on the expert's global row count and the launch's routed rows over every rank
// (FMOE_GEMV_LAUNCH_ROWS below), which ranks and one rank share, so ranks keep one rank's bits. The shared expert
// (its rows are a rank's tokens) never takes this path.
#pragma once
#include "moe_params.cuh"
#include "fp8.cuh"

namespace fmoe {

// FMOE_GEMV: 0 never, 1 fp8 (the default), 2 fp8, bf16 and fp16 (fp32 and tf32 keep their exact tiles). bf16's
// GEMV streams about 2 TB/s, its tiles 3.1 (qwen3-30b-a3b S = 64: 0.585 against 0.377 ms; H200, 2026-12-02), so
// only fp8, whose 128 × 128 tiles are slower still (0.362 ms there, 0.308 as GEMVs), takes it by default.
#ifndef FMOE_GEMV
#define FMOE_GEMV 1
#endif
constexpr int GEMV_TOKENS = 8;  // the MMA's n8: rows of an expert this path takes
constexpr bool GEMV_ON = FMOE_PREC == 4 ? FMOE_GEMV >= 1 : FMOE_PREC >= 2 && FMOE_GEMV >= 2;
constexpr int GEMV_WARPS = THREADS / 32;
// 64-byte chunks (fp8: 128-byte K blocks of two chunks) a lane loads before it multiplies: 8 chunks of 1 KiB a warp,
// 64 KiB a block in flight (16-bit types: two batches of 4, the next in flight while this one multiplies). With one
// batch, 4 and 8 measured the same (bf16 qwen3-30b-a3b S = 64: 0.567 and 0.585 ms), so bytes in flight were not
// what held the GEMV at 2 TB/s; 16 spills. fp8 alike (round 47, Benchmarks/engine/gemv_stream_test.cu, H100): a
// 128 × 2,048-byte tile takes about 8 µs from HBM as from L2, and neither the next K blocks loaded ahead, nor a
// shared-memory ring filled by the copy engine, nor E4M3 warpgroup MMAs (m64n8k32) instead of mma.sync (which ptxas
// runs on Hopper as F16 MMAs after unpacking the operands) made it faster (Benchmarks/RESULTS.md, "Round 47"). The
// harness's copy of this loop has no break test, so its scales load with the codes; in the fused kernel every K block
// waited for its scales until round 50 (FMOE_GEMV_SCALES_AHEAD below), and the kernel's tasks took 14 µs, not 8.
#ifndef FMOE_GEMV_UNROLL
#define FMOE_GEMV_UNROLL 8
#endif
constexpr int GEMV_UNROLL = FMOE_PREC == 4 ? FMOE_GEMV_UNROLL / 2 : FMOE_GEMV_UNROLL;

// FMOE_GEMV_SCALES_AHEAD 1: the fp8 GEMV loads a batch's K-block scales (the weights' and its two columns') with the
// batch's codes; 0, as before round 50: each K block loads its three scales after the batch's break test, which
// kept the compiler from issuing them early (a load past kb1 could fault), so every K block waited a global load's
// round trip before its promotion (sm_90a SASS: the scales' LD.E between the break test and the K block's
// unpacks). Same products, same order: the same bits. Default: 1 except in FMOE_TMA builds, whose consumers run at
// their register limit (with the 12 scales held ahead, the 256-row fp8 TMA kernel of FMOE_FP8_SHARED_WIDE=0
// spilled); by default those are the prefill kernels (launches of at least 256 tokens), where few experts run as
// GEMVs.
#ifndef FMOE_GEMV_SCALES_AHEAD
#define FMOE_GEMV_SCALES_AHEAD (!FMOE_TMA)
#endif

// FMOE_GEMV_LAUNCH_ROWS: on one GPU, a launch that routes at least this many rows (every routed expert's, the task
// space's total) runs no expert as a GEMV. There the other experts' tiles keep every SM busy, and what counts is how
// fast a small expert's weights stream into an SM: a GEMV task loads them into registers a few K blocks at a time
// (and in the TMA kernel, as an own task, stops the block's producer meanwhile), a tile through the stage ring.
// deepseek-v3 fp8 S = 4096 (32,768 rows; H100 trace, Benchmarks/RESULTS.md "Round 34"): its 54 experts of at most
// 8 rows took 18.6 % of the expert phase's block time as GEMVs (about 13 GB/s an SM, from their weights' bytes and
// the traced time, against the GEMM0 tiles' 43). 2,048 = 256 tokens at k = 8, the prefill kernel's first launch
// size (FusedPrefillEngine). The rule reads only the launch's routing, which every kernel of the operator shares,
// so the prefill kernels (TMA, 128 or 256 rows, and the cp.async tiles) keep one another's bits. Ranks count every
// rank's kept rows (launch_rows, task_space.cuh), not only their own experts', so they choose as one rank does.
#ifndef FMOE_GEMV_LAUNCH_ROWS
#define FMOE_GEMV_LAUNCH_ROWS 2048
#endif

// Whether routed expert x's tiles run as GEMVs: at most GEMV_TOKENS rows, in a launch of fewer than
// FMOE_GEMV_LAUNCH_ROWS routed rows (block-uniform).
FMOE_DEVICE bool gemv_expert(const Layout &L, int x) {
    return GEMV_ON && !is_shared(L, x) && rows_of(L, x) <= GEMV_TOKENS && launch_rows(L) < FMOE_GEMV_LAUNCH_ROWS;
}

#if FMOE_PREC >= 2
// Weights are read once per launch and never written: the read-only path, not kept in L1 (and with
// FMOE_DECODE_EVICT_FIRST, common.cuh, evicted first from L2).
FMOE_DEVICE uint4 ld_weights16(const char *p) {
    uint4 v;
    if (FMOE_DECODE_EVICT_FIRST) {
        asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p), "l"(l2_evict_first()));
    } else {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    }
    return v;
}

// d += W(16 × k) · A(k × 8) over the 16 bytes each lane holds of W's rows g and g + 8 (w0, w1) and of A's row g
// (a): two MMAs (m16n8k16 for 16-bit types, m16n8k32 for E4M3), registers in the fragments' order.
FMOE_DEVICE void gemv_mma2(float d[4], const uint4 &w0, const uint4 &w1, const uint4 &a) {
    const u32 fa0[4] = {w0.x, w1.x, w0.y, w1.y}, fb0[2] = {a.x, a.y};
    const u32 fa1[4] = {w0.z, w1.z, w0.w, w1.w}, fb1[2] = {a.z, a.w};
#if FMOE_PREC == 4
    Fp8MmaEngine::mma_e4m3(d, fa0, fb0);
    Fp8MmaEngine::mma_e4m3(d, fa1, fb1);
#else
    MmaEngine<MMA>::mma(d, fa0, fb0);
    MmaEngine<MMA>::mma(d, fa1, fb1);
#endif
}

// A GEMV's operands, set up by the block (shared memory) before the slabs run. Row pointers are bytes; a null row
// reads as zeros.
struct GemvOperands {
    const char *a[GEMV_TOKENS];         // the expert's rows (x, received rows, h or their E4M3 codes)
    const float *a_scale[GEMV_TOKENS];  // fp8: each row's K-block scales
    const char *w;                      // the tile's weight matrix (codes for fp8)
    const float *w_scale;               // fp8: [64-row granule][K block] scales
    int rows;                           // weight rows of the matrix (rows past it read as zeros)
    int k_bytes;                        // bytes of a weight row and of an A row (a multiple of 16)
};

// One warp: acc (rows g, g + 8 of the slab × columns 2t, 2t + 1) = the slab's weight rows wrow0 … + 15 times the
// A rows over K bytes [kb0, kb1). fp8: kb0, kb1 are whole 128-byte K blocks, each promoted on its own.
FMOE_DEVICE void gemv_slab(const GemvOperands &op, int wrow0, int kb0, int kb1, float acc[4]) {
    const int lane = FMOE_TID & 31, g = lane >> 2, t = lane & 3;
    const bool v0 = wrow0 + g < op.rows, v1 = wrow0 + g + 8 < op.rows;
    const char *w0 = op.w + (size_t)(v0 ? wrow0 + g : 0) * op.k_bytes;
    const char *w1 = op.w + (size_t)(v1 ? wrow0 + g + 8 : 0) * op.k_bytes;
    const char *a = op.a[g];
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] = 0.f;
#if FMOE_PREC == 4
    // Scales: the slab's granule (its 16 rows share one) and this lane's two columns' rows.
    const float *ws = op.w_scale + (size_t)((wrow0 < op.rows ? wrow0 : 0) / 64) * ((op.k_bytes + 127) / 128);
    const float *s0 = op.a[2 * t] ? op.a_scale[2 * t] : nullptr;
    const float *s1 = op.a[2 * t + 1] ? op.a_scale[2 * t + 1] : nullptr;
    for (int kb = kb0; kb < kb1; kb += 128 * GEMV_UNROLL) {
        uint4 q0[2 * GEMV_UNROLL], q1[2 * GEMV_UNROLL], qa[2 * GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < 2 * GEMV_UNROLL; ++u) {  // two 64-byte chunks a K block
            const int at = kb + 64 * u + 16 * t;
            const bool in = at < kb1;  // kb1 ≤ k_bytes (gemv_tile)
            q0[u] = in && v0 ? ld_weights16(w0 + at) : zero;
            q1[u] = in && v1 ? ld_weights16(w1 + at) : zero;
            qa[u] = in && a != nullptr ? *(const uint4 *)(a + at) : zero;
        }
        // K block blk's scales: the weights' (0 for a slab past the matrix's rows) and the two columns' (0 for a
        // column past the expert's rows).
        // (`in` false: all 0, nothing loaded.)
        auto scales = [&](int blk, bool in, float &b, float &sa0, float &sa1) {
            b = in && (v0 || v1) ? ws[blk] : 0.f;
            sa0 = in && s0 ? s0[blk] : 0.f;
            sa1 = in && s1 ? s1[blk] : 0.f;
        };
        // FMOE_GEMV_SCALES_AHEAD: the batch's scales load with its codes (a K block past kb1 is never promoted).
        float wsc[GEMV_UNROLL], sc0[GEMV_UNROLL], sc1[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
            scales(kb / 128 + u, FMOE_GEMV_SCALES_AHEAD && kb + 128 * u < kb1, wsc[u], sc0[u], sc1[u]);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int blk = kb / 128 + u;
            if (kb + 128 * u >= kb1) break;  // warp-uniform
            float tmp[4] = {0.f, 0.f, 0.f, 0.f};
            gemv_mma2(tmp, q0[2 * u], q1[2 * u], qa[2 * u]);
            gemv_mma2(tmp, q0[2 * u + 1], q1[2 * u + 1], qa[2 * u + 1]);
            // acc += tmp · (a_scale(column) · w_scale): the tile engines' promotion (wgmma_fp8.cuh).
            float b, sa0, sa1;
            if (FMOE_GEMV_SCALES_AHEAD) b = wsc[u], sa0 = sc0[u], sa1 = sc1[u];
            else scales(blk, true, b, sa0, sa1);
            acc[0] = fmaf(tmp[0], sa0 * b, acc[0]);
            acc[1] = fmaf(tmp[1], sa1 * b, acc[1]);
            acc[2] = fmaf(tmp[2], sa0 * b, acc[2]);
            acc[3] = fmaf(tmp[3], sa1 * b, acc[3]);
        }
    }
#else
    // 16-bit types (FMOE_GEMV 2 only): batches of B chunks, the next batch's loads issued before this batch's MMAs
    // (their SASS, one loop of loads then one chain of 16 MMAs on one accumulator, left no loads in flight while
    // the chain ran), and the chunks alternating between two accumulators, added once at the end.
    constexpr int B = GEMV_UNROLL / 2;
    auto load = [&](int kb, uint4 *q0, uint4 *q1, uint4 *qa) {
#pragma unroll
        for (int u = 0; u < B; ++u) {
            const int at = kb + 64 * u + 16 * t;
            const bool in = at < kb1;
            q0[u] = in && v0 ? ld_weights16(w0 + at) : zero;
            q1[u] = in && v1 ? ld_weights16(w1 + at) : zero;
            qa[u] = in && a != nullptr ? *(const uint4 *)(a + at) : zero;
        }
    };
    float acc2[4] = {0.f, 0.f, 0.f, 0.f};
    uint4 q0[B], q1[B], qa[B];
    load(kb0, q0, q1, qa);
    for (int kb = kb0; kb < kb1; kb += 64 * B) {
        uint4 n0[B], n1[B], na[B];
        load(kb + 64 * B, n0, n1, na);  // past kb1: predicated off, zeros
#pragma unroll
        for (int u = 0; u < B; ++u) gemv_mma2(u % 2 ? acc2 : acc, q0[u], q1[u], qa[u]);
#pragma unroll
        for (int u = 0; u < B; ++u) { q0[u] = n0[u]; q1[u] = n1[u]; qa[u] = na[u]; }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] += acc2[c];
#endif
}

// A tile's weight rows: tile row r is weight row r < half ? lo0 + r : lo1 + (r − half) (gated GEMM0: the gate
// rows, then the up rows that pair with them; otherwise lo0 + r). half is a multiple of 16, so slabs never straddle.
struct GemvRows {
    int lo0, lo1, half;
};
constexpr int GEMV_CS = c_stride<EBN>();  // row stride of the staged result (the wide tile's)

// The block: c[column j][tile row r] (stride GEMV_CS, the tiles' staged layout) for `tile_rows` tile rows (a
// multiple of 16, at most EBN) of `op` (in shared memory, set by the caller). Work items (slab, K part) go round the
// warps; a slab has KP = 8 / slabs parts when slabs < 8, whose sums are added in part order. Leaves c in shared
// memory for the caller's epilogue (after a barrier).
FMOE_DEVICE void gemv_tile(char *smem, const GemvOperands &op, int tile_rows, GemvRows wr) {
    constexpr int UNIT = FMOE_PREC == 4 ? 128 : 64;  // K parts are whole units (fp8: K blocks)
    const int slabs = tile_rows / 16, kp_count = slabs >= GEMV_WARPS ? 1 : GEMV_WARPS / slabs;
    float *c = (float *)smem;
    float *part = c + GEMV_TOKENS * GEMV_CS;  // [item][16 rows][8 columns]
    const int warp = FMOE_TID >> 5, lane = FMOE_TID & 31, g = lane >> 2, t = lane & 3;
    const int units = (op.k_bytes + UNIT - 1) / UNIT;
    for (int item = warp; item < slabs * kp_count; item += GEMV_WARPS) {
        const int slab = item / kp_count, kp = item % kp_count;
        const int u0 = units * kp / kp_count, u1 = units * (kp + 1) / kp_count;
        const int r = slab * 16, w0 = r < wr.half ? wr.lo0 + r : wr.lo1 + r - wr.half;
        float acc[4];
        gemv_slab(op, w0, u0 * UNIT, min(u1 * UNIT, op.k_bytes), acc);
        float *d = part + item * 128;
        d[g * 8 + 2 * t] = acc[0];
        d[g * 8 + 2 * t + 1] = acc[1];
        d[(g + 8) * 8 + 2 * t] = acc[2];
        d[(g + 8) * 8 + 2 * t + 1] = acc[3];
    }
    sync_block();
    for (int u = FMOE_TID; u < tile_rows * GEMV_TOKENS; u += THREADS) {
        const int r = u / GEMV_TOKENS, j = u % GEMV_TOKENS;
        const float *d = part + (r / 16) * kp_count * 128 + (r % 16) * 8 + j;
        float v = d[0];
        for (int kp = 1; kp < kp_count; ++kp) v += d[kp * 128];
        c[j * GEMV_CS + r] = v;
    }
    sync_block();
}

// Sets `op` (threads 0 … 7; the caller synchronises) for GEMM `gemm` of routed expert x (gemv_expert). GEMM0: its
// W1 (or fp8 image) times its rows' x (one GPU: the tokens' rows; ranks: the received rows; fp8: x's codes and
// scales). GEMM1: its W2 times its rows' h (fp8: h's codes and scales).
FMOE_DEVICE void gemv_operands(const Params &p, const Layout &L, int gemm, int x, GemvOperands &op) {
    if (FMOE_TID >= GEMV_TOKENS) return;
    const int r = FMOE_TID;
    const size_t row = (size_t)L.row_start[x] + r;  // the expert's row r (h's row; GEMM0: its token's x row)
    const bool in = r < rows_of(L, x);
    if (r == 0) op.rows = gemm == 0 ? N0 : H;
#if FMOE_PREC == 4
    // E4M3 codes and scales: x's by token, h's by row; the expert's image of W1 or W2 (codes, then scales).
    if (RANKS > 1 && gemm == 0) {
        // Ranks: the rows this owner received, codes then scales (received_codes, moe_params.cuh).
        op.a[r] = in ? (const char *)received_codes(p, (int)row) : nullptr;
        op.a_scale[r] = in ? received_scales(p, (int)row) : nullptr;
    } else {
        const size_t a_row = gemm == 0 ? (size_t)(in ? p.row_token[row] : 0) : row;
        op.a[r] = in ? (const char *)((gemm == 0 ? p.xq : p.hq) + a_row * (gemm == 0 ? H : I)) : nullptr;
        op.a_scale[r] = in ? (gemm == 0 ? p.xq_scale : p.hq_scale) + a_row * (gemm == 0 ? KB_H : KB_I) : nullptr;
    }
    if (r == 0) {  // the matrix: one writer
        op.w = gemm == 0 ? (const char *)p.w1 + (size_t)x * W1_EXPERT_BYTES
                         : (const char *)p.w2 + (size_t)x * W2_EXPERT_BYTES;
        op.w_scale = (const float *)(op.w + (gemm == 0 ? W1_CODES : W2_CODES));
        op.k_bytes = gemm == 0 ? H : I;
    }
#else
    const T *a = gemm == 1 ? p.hbuf + row * I
                 : RANKS > 1 ? p.peers[p.rank].recv + row * H
                             : p.x + (size_t)(in ? p.row_token[row] : 0) * H;
    op.a[r] = in ? (const char *)a : nullptr;
    op.a_scale[r] = nullptr;
    if (r == 0) {
        op.w = (const char *)(gemm == 0 ? p.w1 + (size_t)x * N0 * H : p.w2 + (size_t)x * H * I);
        op.w_scale = nullptr;
        op.k_bytes = (gemm == 0 ? H : I) * (int)sizeof(T);
    }
#endif
}
#endif

}  // namespace fmoe

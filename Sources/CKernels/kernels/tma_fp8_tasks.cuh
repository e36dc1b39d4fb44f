// The fp8 TMA engine's tasks (FMOE_TMA builds of FMOE_PREC 4): what a ticket covers and where a tile's operands and
// scales are. The routed experts' tiles run on tma_fp8_engine.cuh: 128 rows × FMOE_TMA_FP8_BN weight rows, the
// weights by TMA from a 3-D map over the experts' images (FusedTensorMaps.swift), GEMM0's x codes gathered by token,
// GEMM1's h codes by TMA; the bits are the cp.async fp8 tile's (wgmma_fp8.cuh), one or two of its 128-wide column
// tiles side by side. The epilogues: tma_fp8_epilogues.cuh; the phase that runs the tickets: phase_experts_tma_fp8.cuh.
//
// Tickets: the task space stays phase_experts.cuh's (column tiles of EBN = 128), so decode launches, which run that
// file, are unchanged; with 256-row engine tiles (FMOE_TMA_FP8_BN) a ticket is a pair of column tiles 2q, 2q + 1 of
// one row block (the second absent past an odd count), counted together on the row block's counter. GEMM0 tickets:
// every routed row block's NT0Q tickets (column outer within an expert, as phase_experts.cuh orders tiles; with h
// from the accumulators and 128-row tiles, a ticket is the column tiles of one 128-channel group of h), then the
// shared expert's NT0SP pairs; GEMM1 tickets: the ring's row blocks in groups (gemm1_ring_slot) with NT1P tickets
// each. Tiles off the engine are "own" tasks of the consumers in the ring's memory, the producer waiting
// (phase_experts_tma.cuh): experts of at most GEMV_TOKENS rows (gemv_task) and the shared expert, whose weights are
// BF16 (its cp.async mma.sync tiles, expert_tiles.cuh).
#pragma once

#if FMOE_TMA && FMOE_PREC == 4
#include "tma_fp8_engine.cuh"

namespace fmoe {

// FMOE_TMA_FP8_BN (moe_params.cuh, set by the host: FLASHMOE_TMA_FP8_BN): the engine's weight rows a tile, 256 (the
// host's default since round 33) or 128.
// 256 is the faster form in the harness (docs/engine-notes.md, "fp8") and reads half the A bytes a FLOP, but its
// 128 + 64 accumulators a thread need nearly all of the consumers' setmaxnreg budget: rounds 22 and 23 measured it
// slower than 128 rows in the fused kernel while it spilled 376 – 1,480 bytes (Benchmarks/RESULTS.md). With h
// quantized from its accumulators and the scales through the ring (FMOE_FP8_SMEM_SCALES below) its mainloops keep
// 1 – 2 values in local memory (were 6 – 12 reloads a K block) and it is the faster form: 3 – 12 % faster than
// 128-row tiles at S = 512 – 16384 (Benchmarks/RESULTS.md, "Round 30", forced while it still spilled). Since round
// 30 it compiles without spills at the five presets (NVRTC 13.0): %tid.x read afresh (FMOE_FRESH_TID, common.cuh),
// the producer's two GEMMs in calls of their own and two pointers of scale source, the consumers reading each half's
// granule scales with it and the row blocks' count after the tickets. Opt-in until its bits are checked on a GPU.
static_assert(FMOE_TMA_FP8_BN == 128 || FMOE_TMA_FP8_BN == 256, "FMOE_TMA_FP8_BN is 128 or 256");
// FMOE_FP8_SMEM_SCALES (default: with 256-row tiles): the producer copies each K block's scales into the ring
// (TmaFp8Engine's SMEM_SCALES; tma_scale_source_fp8) so the consumers hold no scale pointers in the mainloop, where
// 256-row tiles spilled accumulators. 128-row tiles do not spill and keep the consumers' loads.
#ifndef FMOE_FP8_SMEM_SCALES
#define FMOE_FP8_SMEM_SCALES (FMOE_TMA_FP8_BN == 256)
#endif
constexpr bool FP8_SMEM_SCALES = FMOE_FP8_SMEM_SCALES != 0;
// The A scales' groups (FMOE_FP8_SCALE_GROUP, tma_fp8_engine.cuh): where both GEMMs' K blocks fill whole groups.
constexpr int FP8_SCALE_GROUP =
    FMOE_FP8_SCALE_GROUP > 1 && KB_H % FMOE_FP8_SCALE_GROUP == 0 && KB_I % FMOE_FP8_SCALE_GROUP == 0
        ? FMOE_FP8_SCALE_GROUP : 1;
typedef TmaFp8Engine<TMA_RING_STAGES, FMOE_TMA_FP8_BN, FP8_SMEM_SCALES, FP8_SCALE_GROUP> ExpertTmaFp8;
static_assert(ExpertTmaFp8::STAGE_BYTES == TMA_RING_STAGE_BYTES, "the ring's stages are the fp8 engine's");

// Task-space column tiles (EBN = 128) a ticket covers, and the tickets a row block has: routed GEMM0, the shared
// expert's GEMM0, GEMM1.
constexpr int PAIR = FMOE_TMA_FP8_BN / EBN;
constexpr int NT0SP = (NT0S + PAIR - 1) / PAIR, NT1P = (NT1 + PAIR - 1) / PAIR;

// The column tiles ticket q covers of `nt` (PAIR, or fewer for the last of a count PAIR does not divide).
FMOE_DEVICE int pair_tiles(int q, int nt) { return min(PAIR, nt - PAIR * q); }

// h from the accumulators (FMOE_H_FROM_ACC 1): the block running a routed GEMM0 ticket quantizes the ticket's
// 128-channel groups of h itself (tma_fp8_epilogues.cuh) instead of writing BF16 h for a later pass to read back
// (count_h_groups, phase_experts.cuh), and counts the ticket on done0. With 128-row tiles such a ticket is the column
// tiles of one group (GROUP_TILES, phase_experts.cuh: two gated, one plain), run back to back by one block; a
// 256-row tile already holds whole groups (gated: one, plain: two), so there a ticket stays one tile. 0: routed GEMM0
// tickets are PAIR tiles and h is quantized as the cp.async kernel does. Default: with 256-row tiles; with 128-row
// tiles it measured 4 – 12 % slower than the per-group pass (one block runs a group's tiles in turn where the pass
// spreads them; Benchmarks/RESULTS.md, "Round 30").
#ifndef FMOE_H_FROM_ACC
#define FMOE_H_FROM_ACC (FMOE_TMA_FP8_BN == 256)
#endif
constexpr bool H_FROM_ACC = FMOE_H_FROM_ACC != 0;
static_assert(!ExpertTmaFp8::SPLIT || H_FROM_ACC, "split tiles quantize h from their accumulators");
// Whether a routed GEMM0 ticket is several engine tiles: one group's 128-row tiles.
constexpr bool GROUP_TICKETS = H_FROM_ACC && FMOE_TMA_FP8_BN == 128;
// Column tiles of a routed GEMM0 ticket, and the tickets of a routed row block.
constexpr int QT = GROUP_TICKETS ? GROUP_TILES : PAIR;
constexpr int NT0Q = (NT0 + QT - 1) / QT;

// The column tiles GEMM0 ticket q of task-space expert x covers: n0 … n0 + count − 1.
FMOE_DEVICE void gemm0_ticket_tiles(const Layout &L, int x, int q, int &n0, int &count) {
    const int per = is_shared(L, x) ? PAIR : QT, nt = is_shared(L, x) ? NT0S : NT0;
    n0 = per * q;
    count = min(per, nt - n0);
}

// The GEMM0 tickets of a launch: the routed row blocks' groups (pairs), then the shared expert's pairs.
FMOE_DEVICE int fp8_gemm0_tickets(const Layout &L) {
    const int routed = L.rb_start[L.xs - 1];
    return routed * NT0Q + (L.rb_start[L.xs] - routed) * NT0SP;
}

// GEMM0 ticket → (kind, expert, row block, pair): within an expert the row block is the inner index, so the blocks
// running at once share one weight slab (phase_experts.cuh's order).
FMOE_DEVICE int4 fp8_gemm0_task(const Layout &L, int ticket) {
    const int routed = L.rb_start[L.xs - 1];
    int x, local;
    if (ticket < routed * NT0Q) {
        // Every routed row block has NT0Q tickets: the expert is the one holding row block ticket / NT0Q.
        x = find_segment(L.rb_start, L.xs, ticket / NT0Q);
        local = ticket - L.rb_start[x] * NT0Q;
    } else {
        x = L.xs - 1;
        local = ticket - routed * NT0Q;
    }
    const int mt = L.rb_start[x + 1] - L.rb_start[x];
    const bool own = is_shared(L, x) || gemv_expert(L, x);
    return make_int4(own ? TASK_OWN0 : TASK_GEMM0, x, local % mt, local / mt);
}

// The engine's tile for routed ticket (x, m, q): GEMM0 gathers x codes by token (K = H), GEMM1 reads the row block's h
// codes by TMA (K = I); B is expert x's weight rows BN·q … of its image.
FMOE_DEVICE TmaTile tma_tile_fp8(const Params &p, const Layout &L, const TmaMaps &maps, int kind, int x, int m,
                                 int q) {
    const int row0 = m * BM;
    TmaTile t;
    t.b_row0 = FMOE_TMA_FP8_BN * q;
    t.b_image = x;
    t.map_a = nullptr;
    t.a_row0 = 0;
    t.a_index = nullptr;
    t.a_base = nullptr;
    t.a_stride = 0;
    t.a_rows = rows_of(L, x) - row0;
    if (kind == TASK_GEMM0) {
        t.map_b = &maps.w1;
        t.a_base = (const char *)p.xq;
        t.a_stride = (size_t)H;
        t.a_index = p.row_token + L.row_start[x] + row0;
        t.k_bytes = H;
    } else {
        // h rows past the expert's are the next expert's codes or zero-filled past the buffer: they reach only
        // output rows the epilogue masks, and their A scales are 0 (tma_scales_fp8).
        t.map_b = &maps.w2;
        t.map_a = &maps.hbuf;
        t.a_row0 = L.row_start[x] + row0;
        t.k_bytes = I;
    }
    return t;
}

// The scales of routed ticket (x, m, q): this thread's two accumulator rows' A scales (x's by token for GEMM0, h's by
// row for GEMM1; rows past the expert's: none, so 0) and the tile's 64-row weight granules from x's image.
constexpr int GRANULES = FMOE_TMA_FP8_BN / 64;
// Expert x's weight-granule scales of GEMM0 (w1) or GEMM1 (w2): [granule][K block] floats after the codes of its
// image (FusedDeviceWeights+FP8.swift).
FMOE_DEVICE const float *weight_scales_fp8(const Params &p, bool gemm0, int x) {
    return gemm0 ? (const float *)((const unsigned char *)p.w1 + (size_t)x * W1_EXPERT_BYTES + W1_CODES)
                 : (const float *)((const unsigned char *)p.w2 + (size_t)x * W2_EXPERT_BYTES + W2_CODES);
}
FMOE_DEVICE TmaFp8Scales tma_scales_fp8(const Params &p, const Layout &L, int kind, int x, int m, int q) {
    if (FP8_SMEM_SCALES) return TmaFp8Scales{};  // the ring carries them (tma_scale_source_fp8)
    const int rows = rows_of(L, x), first = m * BM, r0 = wgmma_acc_row();
    const int base = L.row_start[x] + first;
    const bool v0 = first + r0 < rows, v1 = first + r0 + 8 < rows;
    TmaFp8Scales sc;
    if (kind == TASK_GEMM0) {
        sc.a0 = v0 ? p.xq_scale + (size_t)p.row_token[base + r0] * KB_H : nullptr;
        sc.a1 = v1 ? p.xq_scale + (size_t)p.row_token[base + r0 + 8] * KB_H : nullptr;
        sc.b = weight_scales_fp8(p, true, x) + (size_t)(GRANULES * q) * KB_H;
        sc.kb_count = KB_H;
        sc.granules = G0 - GRANULES * q;
    } else {
        sc.a0 = v0 ? p.hq_scale + (size_t)(base + r0) * KB_I : nullptr;
        sc.a1 = v1 ? p.hq_scale + (size_t)(base + r0 + 8) * KB_I : nullptr;
        sc.b = weight_scales_fp8(p, false, x) + (size_t)(GRANULES * q) * KB_I;
        sc.kb_count = KB_I;
        sc.granules = G1 - GRANULES * q;
    }
    return sc;
}

// Where producer thread pt finds its scales of routed ticket (x, m, q) with FP8_SMEM_SCALES: tile row pt's A scales
// (as tma_scales_fp8 finds a consumer row's) and, for pt < 2 · PAIR, the tile's weight granule pt's.
FMOE_DEVICE TmaFp8ScaleSource tma_scale_source_fp8(const Params &p, const Layout &L, int kind, int x, int m, int q,
                                                   int pt) {
    const int rows = rows_of(L, x), r = m * BM + pt;
    const int row = L.row_start[x] + r;
    const bool v = r < rows;
    const bool g0 = kind == TASK_GEMM0;
    const int kb = g0 ? KB_H : KB_I, granules = (g0 ? G0 : G1) - GRANULES * q;
    TmaFp8ScaleSource ss;
    if (g0) ss.a = v ? p.xq_scale + (size_t)p.row_token[row] * KB_H : nullptr;
    else ss.a = v ? p.hq_scale + (size_t)row * KB_I : nullptr;
    ss.b = pt < granules ? weight_scales_fp8(p, g0, x) + (size_t)(GRANULES * q + pt) * kb : nullptr;
    return ss;
}

}  // namespace fmoe
#endif

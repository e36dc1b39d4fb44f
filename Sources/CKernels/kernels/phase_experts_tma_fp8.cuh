// Phase 3 of precision fp8 on the sm_90a TMA engine (FMOE_TMA builds of FMOE_PREC 4; included by
// phase_experts_tma.cuh, whose roles, hand-over and ticket queue it shares): the producer's ticket loop and the
// consumers', and the consumers' own tasks (small experts' GEMVs, the shared expert's BF16 tiles: with 256-row tiles
// a ticket's pair as one 128 × 256 tile). The tickets and tiles are tma_fp8_tasks.cuh's, GEMM0's epilogues
// tma_fp8_epilogues.cuh's.
//
// h: with h from the accumulators (FMOE_H_FROM_ACC, default with 256-row tiles) the block running a routed GEMM0
// ticket quantizes its groups to E4M3 and counts the ticket on done0, whose last count publishes the row block;
// otherwise, and for GEMV experts, GEMM0's epilogue writes BF16 rows (hbuf) and the block completing a group (a row
// block, for GEMV experts) quantizes them (count_gemm0_tile_fp8, phase_experts.cuh). The codes are read by other
// blocks' TMA, so they are fenced to the async proxy before the release.
#pragma once

#if FMOE_TMA && FMOE_PREC == 4
#include "tma_fp8_epilogues.cuh"

namespace fmoe {

#if FMOE_FP8_SMEM_SCALES
// The ring's scales (TmaFp8Engine's SMEM_SCALES): written by the producer's copies, read by the consumers.
__shared__ float s_fp8_scales[TMA_RING_STAGES * ExpertTmaFp8::SCALES];
#define FMOE_FP8_RING_SCALES s_fp8_scales
#else
#define FMOE_FP8_RING_SCALES nullptr
#endif

// The producer warpgroup's expert phase: pair tickets, each handed over and, for the engine's tasks, loaded.
FMOE_DEVICE void expert_producer_fp8(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    const int pt = (int)FMOE_TID - PHASE_THREADS;
    ExpertTmaFp8 eng;
    eng.attach(smem, s_tma.ring_bars, FMOE_FP8_RING_SCALES);
    if (pt == 0) {
        tma_prefetch_map(&maps.w1);
        tma_prefetch_map(&maps.w2);
        tma_prefetch_map(&maps.hbuf);
    }
    u32 qi = 0, owns = 0;
    for (;;) {
        const int4 t = s_tma.tq.produce(qi, pt, [&]() -> int4 {
            // The ticket space's bounds are read from the shared Layout for every ticket: held across the loop, in
            // the producer's 72 registers, ptxas spilled them to local memory (paper-e64's plain FFN: 16 B; NVRTC
            // 13.0, round 25).
            const int t0_total = fp8_gemm0_tickets(L);
            const int rbs = L.rb_start[L.xs];
            const int total = t0_total + rbs * NT1P;
            const int ticket = atomicAdd(&p.sync->ticket, 1);
            if (ticket >= total) return make_int4(TASK_END, 0, 0, 0);
            if (ticket < t0_total) return fp8_gemm0_task(L, ticket);
            int pos, q;
            gemm1_ring_slot(ticket - t0_total, rbs, RING_GROUP, NT1P, pos, q);
            const int rb = ring_row_block(p, pos);  // fenced for the TMA reads of its h codes
            if (rb < 0) return make_int4(TASK_FAIL, 0, 0, 0);
            const int x = find_segment(L.rb_start, L.xs, rb);
            const bool own = is_shared(L, x) || gemv_expert(L, x);
            return make_int4(own ? TASK_OWN1 : TASK_GEMM1, x, rb - L.rb_start[x], q);
        });
        if (t.x < 0) break;
        if (t.x >= TASK_OWN0) {
            // The consumers run these tiles in the ring's memory: load nothing until they are done.
            mbar_wait(&s_tma.own_done, owns & 1);
            ++owns;
            continue;
        }
        if (GROUP_TICKETS && t.x == TASK_GEMM0) {
            // A group's column tiles, as gemm0_group_fp8 consumes them.
            for (int j = 0; j < min(QT, NT0 - QT * t.w); ++j)
                eng.produce(tma_tile_fp8(p, L, maps, TASK_GEMM0, t.y, t.z, QT * t.w + j),
                            tma_scale_source_fp8(p, L, TASK_GEMM0, t.y, t.z, QT * t.w + j, pt));
        } else if (!FP8_SMEM_SCALES) {
            eng.produce(tma_tile_fp8(p, L, maps, t.x, t.y, t.z, t.w));
        } else if (t.x == TASK_GEMM0) {
            // One call for each GEMM: each inlined with its own constants (GEMM0 gathers, GEMM1 loads A by TMA), so
            // the producer's loop holds only one GEMM's operands (with the ring's scales it spilled at 72 registers).
            eng.produce(tma_tile_fp8(p, L, maps, TASK_GEMM0, t.y, t.z, t.w),
                        tma_scale_source_fp8(p, L, TASK_GEMM0, t.y, t.z, t.w, pt));
        } else {
            eng.produce(tma_tile_fp8(p, L, maps, TASK_GEMM1, t.y, t.z, t.w),
                        tma_scale_source_fp8(p, L, TASK_GEMM1, t.y, t.z, t.w, pt));
        }
    }
}

// FMOE_FP8_SHARED_WIDE (256-row TMA kernels whose shared expert runs wgmma; ignored elsewhere): 1 (default), a
// shared ticket's two 128-wide column tiles run as one 128 × 256 BF16 tile (WgmmaEngine<MMA_BF16, 256>), which loads
// the ticket's A rows once instead of twice: 85 FLOP a loaded byte instead of 64. Each output element is the same
// k16 instructions in the same K order from zero as in a 128-wide tile (as the half tiles of expert_tiles.cuh), so
// the bits of the cp.async kernel's 128-wide tiles (compared on an H200 at deepseek-v3 S = 300 and 4096), and
// deepseek-v3 S = 4096 ran 6.92 → 6.68 ms (H200, Benchmarks/RESULTS.md "Round 36"). 0: two 128-wide tiles
// (gemm0_task / gemm1_task).
#if FMOE_FP8_SHARED_WGMMA && FMOE_WGMMA && FMOE_TMA_FP8_BN == 256
#ifndef FMOE_FP8_SHARED_WIDE
#define FMOE_FP8_SHARED_WIDE 1
#endif
#else
#undef FMOE_FP8_SHARED_WIDE
#define FMOE_FP8_SHARED_WIDE 0
#endif
#if FMOE_FP8_SHARED_WIDE
typedef WgmmaEngine<MMA_BF16, 2 * EBN> SharedWideEngine;
constexpr int SHARED_WIDE_STAGES = EXPERT_RING_BYTES / stage_bytes<SharedWideEngine::BN>();
static_assert(SHARED_WIDE_STAGES >= 3 && BM * c_stride<SharedWideEngine::BN>() * 4 <= EXPERT_RING_BYTES,
              "the wide shared tiles' stages and staged tile live in the expert ring");

// The shared expert's column tiles n0, n0 + 1 of row block m as one 128 × 256 tile: GEMM0 (x rows by token, w1s rows
// EBN·n0 …; gated: each 128-wide half is its own tile's gate and up columns) or GEMM1 (h rows, w2s rows EBN·n0 …).
FMOE_DEVICE void shared_wide_tile(const Params &p, const Layout &L, int gemm, int x, int m, int n0, char *smem) {
    FMOE_TRACE_HELD_SCOPE(gemm == 0 ? FMOE_EV_GEMM0 : FMOE_EV_GEMM1, x, m, n0);
    constexpr int WN = SharedWideEngine::BN, CS = c_stride<WN>();
    const int rows = p.tokens, row0 = m * BM;
    TileSource src;
    if (gemm == 0) {
        src.k_bytes = H * (int)sizeof(T);
        gemm0_x_rows<BM>(p, L, x, true, rows, row0, src.a, src.a_valid);
        point_rows<WN>(src.b, src.b_valid, p.ws1, n0 * EBN, N0S, H);
    } else {
        src.k_bytes = IS * (int)sizeof(T);
        point_rows<BM>(src.a, src.a_valid, h_rows(p, L, x), row0, rows, IS);
        point_rows<WN>(src.b, src.b_valid, p.ws2, n0 * EBN, H, IS);
    }
    gemm_tile_wgmma<SharedWideEngine, SHARED_WIDE_STAGES>(smem, src);
    const float *c = (const float *)smem;
    if (gemm == 1) {
        gemm1_store<BM, CS, WN>(p, L, x, true, rows, row0, n0 * EBN, c);
    } else if (GATED) {
        gemm0_store<BM, CS, EBN / 2>(p, L, x, rows, row0, n0 * (EBN / 2), c);
        gemm0_store<BM, CS, EBN / 2>(p, L, x, rows, row0, (n0 + 1) * (EBN / 2), c + EBN);
    } else {
        gemm0_store<BM, CS, WN>(p, L, x, rows, row0, n0 * EBN, c);
    }
    sync_block();  // the staged tile is read before the ring is loaded again
}
#endif

// An own task's column tiles n0 … n0 + count − 1 (the consumers, in the ring's memory): the GEMV of a small routed
// expert, or the shared expert's BF16 tiles (gemm0_task / gemm1_task, expert_tiles.cuh; a pair as one wide tile).
FMOE_DEVICE void own_tiles_fp8(const Params &p, const Layout &L, int gemm, int x, int m, int n0, int count,
                               char *smem) {
#if FMOE_FP8_SHARED_WIDE
    if (count == 2 && is_shared(L, x)) {
        shared_wide_tile(p, L, gemm, x, m, n0, smem);
        return;
    }
#endif
    for (int n = n0; n < n0 + count; ++n) {
        if (gemv_expert(L, x)) gemv_task(p, L, gemm, x, n, 0, 1, smem);
        else if (gemm == 0) gemm0_task(p, L, x, m, n, smem);
        else gemm1_task(p, L, x, m, n, smem);
    }
}

// The consumers' expert phase (the 256 phase threads), after the hand-over; returns as expert_phase does.
FMOE_DEVICE bool expert_consumers_fp8(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    FMOE_TRACE_PHASE_SCOPE(FMOE_EV_EXPERT_PHASE);
    ExpertTmaFp8 eng;
    eng.attach(smem, s_tma.ring_bars, FMOE_FP8_RING_SCALES);
    // The row blocks' count: 256-row tiles read it from the shared Layout after the tickets, as held through their
    // mainloops it was spilled; 128-row tiles hold it (their code as measured).
    const int rbs_held = FMOE_TMA_FP8_BN == 256 ? 0 : L.rb_start[L.xs];
    u32 qi = 0;
    if (ExpertTmaFp8::ORDERED) order_issue_open();  // the ordered issue's first arrival (ptx_sm90.cuh)
    for (;;) {
        // Storage-rows builds keep the queue's count in shared memory (tma_queue.cuh): in a register it spilled.
        const int4 t = next_task<FMOE_RET_T != 0>(p, qi);
        if (t.x == TASK_FAIL) return false;
        if (t.x == TASK_END) break;
        const int kind = t.x, x = t.y, m = t.z, q = t.w;
        const int rb = L.rb_start[x] + m;
        if (kind == TASK_GEMM0 || kind == TASK_OWN0) {
            const int nt = is_shared(L, x) ? NT0S : NT0;
            int n0, count;
            gemm0_ticket_tiles(L, x, q, n0, count);
            if (kind == TASK_GEMM0 && H_FROM_ACC) {
                {
                    FMOE_TRACE_HELD_SCOPE(FMOE_EV_GEMM0, x, m, n0);
                    if constexpr (GROUP_TICKETS) {
                        gemm0_group_fp8(p, L, maps, eng, x, m, q);
                    } else {
                        float acc[ExpertTmaFp8::ACC];
                        eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM0, x, m, q),
                                    tma_scales_fp8(p, L, TASK_GEMM0, x, m, q), acc);
                        gemm0_quantize_acc_fp8(p, L, x, m, q, acc);
                    }
                }
                FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n0);
                // The codes are read by other blocks' TMA (the async proxy); released with the count, whose last
                // arrival (of the row block's NT0Q groups) publishes the row block.
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
                if (last_arrival(&p.done0[rb], NT0Q) && FMOE_TID == 0) publish_row_block(p, rb);
                continue;
            }
            if (kind == TASK_GEMM0) {
                FMOE_TRACE_HELD_SCOPE(FMOE_EV_GEMM0, x, m, n0);
                float acc[ExpertTmaFp8::ACC];
                eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM0, x, m, q), tma_scales_fp8(p, L, TASK_GEMM0, x, m, q),
                            acc);
                gemm0_store_acc_fp8(p, L, x, m, q, acc);
            } else {
                own_tiles_fp8(p, L, 0, x, m, n0, count, smem);
            }
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n0);
            count_gemm0_tile_fp8<true>(p, L, x, m, rb, nt, n0, 1, count);  // phase_experts.cuh
        } else {
            if (kind == TASK_GEMM1) {
                FMOE_TRACE_HELD_SCOPE(FMOE_EV_GEMM1, x, m, PAIR * q);
                float acc[ExpertTmaFp8::ACC];
                eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM1, x, m, q), tma_scales_fp8(p, L, TASK_GEMM1, x, m, q),
                            acc);
                // Column tiles PAIR·q … of EBN = 128 are output columns BN·q …
                gemm1_store_acc<FMOE_TMA_FP8_BN>(p, L, x, m, PAIR * q, acc);
            } else {
                own_tiles_fp8(p, L, 1, x, m, PAIR * q, pair_tiles(q, NT1), smem);
            }
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, PAIR * q);
            count_gemm1_tile(p, L, x, m, rb, NT1, pair_tiles(q, NT1));
        }
        if (kind >= TASK_OWN0) own_task_done();
    }
    if (ExpertTmaFp8::ORDERED) order_issue_close();  // its last wait
    const int rbs = FMOE_TMA_FP8_BN == 256 ? L.rb_start[L.xs] : rbs_held;
    return sync_block_and(drain_combines(p, gemm1_done_target(rbs, NT1))) != 0;
}

}  // namespace fmoe
#endif

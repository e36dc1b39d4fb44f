// Phase 3 of precision fp8 on the sm_90a TMA engine (FMOE_TMA builds of FMOE_PREC 4; included by
// phase_experts_tma.cuh, whose roles, hand-over and ticket queue it shares). The routed experts' tiles run on
// tma_fp8_engine.cuh: 128 rows × FMOE_TMA_FP8_BN weight rows, the weights by TMA from a 3-D map over the experts'
// images (FusedTensorMaps.swift), GEMM0's x codes gathered by token, GEMM1's h codes by TMA; the bits are the
// cp.async fp8 tile's (wgmma_fp8.cuh), one or two of its 128-wide column tiles side by side.
//
// Tickets: the task space stays phase_experts.cuh's (column tiles of EBN = 128), so decode launches, which run that
// file, are unchanged; with 256-row engine tiles (FMOE_TMA_FP8_BN) a ticket is a pair of column tiles 2q, 2q + 1 of
// one row block (the second absent past an odd count), counted together on the row block's counter. GEMM0 tickets:
// every routed row block's NT0P tickets (column outer within an expert, as phase_experts.cuh orders tiles), then the
// shared expert's NT0SP; GEMM1 tickets: the ring's row blocks in groups (gemm1_ring_slot) with NT1P tickets each.
// Tiles off the engine are "own" tasks of the consumers in the ring's memory, the producer waiting
// (phase_experts_tma.cuh): experts of at most GEMV_TOKENS rows (gemv_task) and the shared expert, whose weights are
// BF16 (its cp.async mma.sync tiles, expert_tiles.cuh).
//
// h: GEMM0's epilogue writes BF16 rows (hbuf); the block whose pair completes a 128-channel group of a row block
// (a row block, for GEMV experts) quantizes it to E4M3 (count_gemm0_tile_fp8, phase_experts.cuh), and the block
// completing the row block publishes it; the codes are read by other blocks' TMA, so they are fenced to the async
// proxy before the release.
#pragma once

#if FMOE_TMA && FMOE_PREC == 4
#include "tma_fp8_engine.cuh"

namespace fmoe {

// FMOE_TMA_FP8_BN (phase_experts_tma.cuh, set by the host): the engine's weight rows a tile, 128 (default) or 256.
// 256 is the faster form in the harness (docs/engine-notes.md, "fp8"), but its 128 + 64 accumulators a thread need
// the consumers' whole setmaxnreg budget: with their task wait's trap (FMOE_TMA_CONSUMER_TRAP 1) ptxas (CUDA 13.0)
// spilled them inside the mainloop (qwen3-30b-a3b: 1,480 bytes); without it 376 bytes remain, and the 256-row form
// is still slower in the fused kernel than 128 (64 + 64) rows (Benchmarks/RESULTS.md, rounds 22 and 23).
static_assert(FMOE_TMA_FP8_BN == 128 || FMOE_TMA_FP8_BN == 256, "FMOE_TMA_FP8_BN is 128 or 256");
typedef TmaFp8Engine<TMA_RING_STAGES, FMOE_TMA_FP8_BN> ExpertTmaFp8;
static_assert(ExpertTmaFp8::STAGE_BYTES == TMA_RING_STAGE_BYTES, "the ring's stages are the fp8 engine's");

// Task-space column tiles (EBN = 128) a ticket covers, and the tickets a row block has: routed GEMM0, the shared
// expert's GEMM0, GEMM1.
constexpr int PAIR = FMOE_TMA_FP8_BN / EBN;
constexpr int NT0P = (NT0 + PAIR - 1) / PAIR, NT0SP = (NT0S + PAIR - 1) / PAIR, NT1P = (NT1 + PAIR - 1) / PAIR;

// The column tiles ticket q covers of `nt` (PAIR, or fewer for the last of a count PAIR does not divide).
FMOE_DEVICE int pair_tiles(int q, int nt) { return min(PAIR, nt - PAIR * q); }

// The GEMM0 tickets of a launch: the routed row blocks' pairs, then the shared expert's.
FMOE_DEVICE int fp8_gemm0_tickets(const Layout &L) {
    const int routed = L.rb_start[L.xs - 1];
    return routed * NT0P + (L.rb_start[L.xs] - routed) * NT0SP;
}

// GEMM0 ticket → (kind, expert, row block, pair): within an expert the row block is the inner index, so the blocks
// running at once share one weight slab (phase_experts.cuh's order).
FMOE_DEVICE int4 fp8_gemm0_task(const Layout &L, int ticket) {
    const int routed = L.rb_start[L.xs - 1];
    int x, local;
    if (ticket < routed * NT0P) {
        // Every routed row block has NT0P pairs: the expert is the one holding row block ticket / NT0P.
        x = find_segment(L.rb_start, L.xs, ticket / NT0P);
        local = ticket - L.rb_start[x] * NT0P;
    } else {
        x = L.xs - 1;
        local = ticket - routed * NT0P;
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
FMOE_DEVICE TmaFp8Scales tma_scales_fp8(const Params &p, const Layout &L, int kind, int x, int m, int q) {
    const int rows = rows_of(L, x), first = m * BM, r0 = wgmma_acc_row();
    const int base = L.row_start[x] + first;
    const bool v0 = first + r0 < rows, v1 = first + r0 + 8 < rows;
    TmaFp8Scales sc;
    const unsigned char *image;
    if (kind == TASK_GEMM0) {
        sc.a0 = v0 ? p.xq_scale + (size_t)p.row_token[base + r0] * KB_H : nullptr;
        sc.a1 = v1 ? p.xq_scale + (size_t)p.row_token[base + r0 + 8] * KB_H : nullptr;
        image = (const unsigned char *)p.w1 + (size_t)x * W1_EXPERT_BYTES;
        sc.b = (const float *)(image + W1_CODES) + (size_t)(GRANULES * q) * KB_H;
        sc.kb_count = KB_H;
        sc.granules = G0 - GRANULES * q;
    } else {
        sc.a0 = v0 ? p.hq_scale + (size_t)(base + r0) * KB_I : nullptr;
        sc.a1 = v1 ? p.hq_scale + (size_t)(base + r0 + 8) * KB_I : nullptr;
        image = (const unsigned char *)p.w2 + (size_t)x * W2_EXPERT_BYTES;
        sc.b = (const float *)(image + W2_CODES) + (size_t)(GRANULES * q) * KB_I;
        sc.kb_count = KB_I;
        sc.granules = G1 - GRANULES * q;
    }
    return sc;
}

// GEMM0's epilogue of routed ticket (x, m, q) from the accumulators (128-row half h's registers 64h …, together the
// m64nBN layout): the packed weight rows are blocks of 64 gate rows and their 64 up rows
// (FusedDeviceWeights+FP8.swift), so output column (BN/2)·q + 8j + … is half j / 8's gate register 4j + c (+ 32 for
// j ≥ 8) and its up register 32 further. Gated: act(gate) · up; plain: act(acc + b1). gemm0_store's arithmetic, so
// the bits of the cp.async tile.
FMOE_DEVICE void gemm0_store_acc_fp8(const Params &p, const Layout &L, int x, int m, int q, const float *acc) {
    constexpr int OUT_COLS = GATED ? FMOE_TMA_FP8_BN / 2 : FMOE_TMA_FP8_BN;
    store_acc_pairs<OUT_COLS>(h_rows(p, L, x), I, I, rows_of(L, x), m * BM, q * OUT_COLS, [&](int c, int col) {
        if (GATED) {
            const int g = c < 32 ? c : c + 32;
            return pack_t2(activation(acc[g]) * acc[g + 32], activation(acc[g + 1]) * acc[g + 33]);
        }
        const bool bias = p.b1 != nullptr && col < I;
        return pack_t2(activation(acc[c] + (bias ? p.b1[(size_t)x * I + col] : 0.f)),
                       activation(acc[c + 1] + (bias ? p.b1[(size_t)x * I + col + 1] : 0.f)));
    });
}

// The producer warpgroup's expert phase: pair tickets, each handed over and, for the engine's tasks, loaded.
FMOE_DEVICE void expert_producer_fp8(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    const int pt = (int)threadIdx.x - PHASE_THREADS;
    ExpertTmaFp8 eng;
    eng.attach(smem, s_tma.ring_bars);
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
        eng.produce(tma_tile_fp8(p, L, maps, t.x, t.y, t.z, t.w));
    }
}

// An own task's tiles of pair q (the consumers, in the ring's memory): the GEMV of a small routed expert, or the
// shared expert's mma.sync tiles (gemm0_task / gemm1_task, expert_tiles.cuh).
FMOE_DEVICE void own_pair_fp8(const Params &p, const Layout &L, int gemm, int x, int m, int q, int nt, char *smem) {
    for (int n = PAIR * q; n < PAIR * q + pair_tiles(q, nt); ++n) {
        if (gemv_expert(L, x)) gemv_task(p, L, gemm, x, n, 0, 1, smem);
        else if (gemm == 0) gemm0_task(p, L, x, m, n, smem);
        else gemm1_task(p, L, x, m, n, smem);
    }
}

// The consumers' expert phase (the 256 phase threads), after the hand-over; returns as expert_phase does.
FMOE_DEVICE bool expert_consumers_fp8(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_EXPERT_PHASE, -1, 0, 0);
    ExpertTmaFp8 eng;
    eng.attach(smem, s_tma.ring_bars);
    const int rbs = L.rb_start[L.xs];
    u32 qi = 0;
    for (;;) {
        const int4 t = next_task(p, qi);
        if (t.x == TASK_FAIL) return false;
        if (t.x == TASK_END) break;
        const int kind = t.x, x = t.y, m = t.z, q = t.w;
        const int rb = L.rb_start[x] + m;
        if (kind == TASK_GEMM0 || kind == TASK_OWN0) {
            const int nt = is_shared(L, x) ? NT0S : NT0;
            if (kind == TASK_GEMM0) {
                FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, PAIR * q);
                float acc[ExpertTmaFp8::ACC];
                eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM0, x, m, q), tma_scales_fp8(p, L, TASK_GEMM0, x, m, q),
                            acc);
                gemm0_store_acc_fp8(p, L, x, m, q, acc);
            } else {
                own_pair_fp8(p, L, 0, x, m, q, nt, smem);
            }
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, PAIR * q);
            count_gemm0_tile_fp8<true>(p, L, x, m, rb, nt, PAIR * q, 1, pair_tiles(q, nt));  // phase_experts.cuh
        } else {
            if (kind == TASK_GEMM1) {
                FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, PAIR * q);
                float acc[ExpertTmaFp8::ACC];
                eng.consume(tma_tile_fp8(p, L, maps, TASK_GEMM1, x, m, q), tma_scales_fp8(p, L, TASK_GEMM1, x, m, q),
                            acc);
                // Column tiles PAIR·q … of EBN = 128 are output columns BN·q …
                gemm1_store_acc<FMOE_TMA_FP8_BN>(p, L, x, m, PAIR * q, acc);
            } else {
                own_pair_fp8(p, L, 1, x, m, q, NT1, smem);
            }
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, PAIR * q);
            count_gemm1_tile(p, L, x, m, rb, NT1, pair_tiles(q, NT1));
        }
        if (kind >= TASK_OWN0) own_task_done();
    }
    return sync_block_and(drain_combines(p, gemm1_done_target(rbs, NT1))) != 0;
}

}  // namespace fmoe
#endif
